"""Thin entry point: see seq2seq/benchmark.py (run on demand, not in CI)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seq2seq.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
