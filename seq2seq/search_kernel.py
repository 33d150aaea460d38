"""Beam search's candidate selection as one C kernel on float32 CPU tensors (``models/csrc/beam_candidates.c``).

Each step, beam search keeps every sentence's 2K best extensions of its K beams. ``search._top_candidates_thresholded``
finds them with ATen in some twenty operations (block maxima, a top-k, two nonzero, gathers, two sorts), which
took a tenth of a beam-5 decoding of test2016 with the lexical shortlist on one thread; their results are the
kernel's exactly (tests). Built on first use (``models/clib.py``); without a compiler, on GPUs and with
``SEQ2SEQ_SEARCH_KERNEL=0`` the ATen path runs.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from seq2seq.models import clib
from seq2seq.models.clib import INT, POINTER

PARALLEL_ELEMENTS = 2**18  # fewer log-probabilities than this on one thread


class _Kernel:
    """The loaded library's function: log_probs, scores, the three outputs, then b, K, V, W and the thread count;
    it returns the number of sentences with too few finite extensions."""

    def __init__(self, library: ctypes.CDLL):
        self.beam_candidates = clib.declare(library.beam_candidates, [POINTER] * 5 + [INT] * 5)
        self.beam_candidates.restype = ctypes.c_int64


LIBRARY = clib.Library("beam_candidates.c", "SEQ2SEQ_SEARCH_KERNEL", "beam search's candidates", _Kernel)


def top_candidates(scores: torch.Tensor, log_probs: torch.Tensor, k: int, width: Optional[int] = None
                   ) -> Optional[tuple]:
    """scores [b, K], log_probs [b*K, V] -> (scores [b, W], parent beams [b, W], tokens [b, W]), each sentence's
    W best extensions (``width``, by default 2K), best first, ties in (beam, token) order; None where the kernel
    does not apply (not float32 CPU tensors, not built) or a sentence has fewer than W extensions with a finite
    score."""
    b, vocab, width = scores.size(0), log_probs.size(-1), width or 2 * k
    if not LIBRARY.usable(scores, log_probs) or log_probs.shape != (b * k, vocab) or scores.shape != (b, k):
        return None
    log_probs, scores = log_probs.contiguous(), scores.contiguous()
    cand_scores = torch.empty(b, width)
    cand_beams, cand_tokens = (torch.empty(b, width, dtype=torch.long) for _ in range(2))
    short = LIBRARY.get().beam_candidates(log_probs.data_ptr(), scores.data_ptr(), cand_scores.data_ptr(),
                                          cand_beams.data_ptr(), cand_tokens.data_ptr(), b, k, vocab, width,
                                          clib.threads_for(log_probs.numel(), PARALLEL_ELEMENTS))
    return None if short else (cand_scores, cand_beams, cand_tokens)  # short < 0: no memory for a buffer
