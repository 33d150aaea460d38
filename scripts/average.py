"""Thin entry point: see seq2seq/average.py (also installed as the console script seq2seq-average)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seq2seq.average import main  # noqa: E402

if __name__ == "__main__":
    main()
