"""seq2seq: recurrent neural machine translation in PyTorch."""
__version__ = "0.1.0"
