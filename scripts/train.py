"""Thin entry point: see seq2seq/cli.py (also installed as the console script seq2seq-train)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seq2seq.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main()
