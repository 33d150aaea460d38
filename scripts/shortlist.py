"""Thin entry point: see seq2seq/shortlist.py (also installed as the console script seq2seq-shortlist)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seq2seq.shortlist import main  # noqa: E402

if __name__ == "__main__":
    main()
