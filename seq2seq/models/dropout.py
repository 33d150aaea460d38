"""Dropout whose mask is cheap to draw on the CPU.

PyTorch's CPU dropout draws one random number per element through ``bernoulli_``, about 14 ns per
element here: 7 % of a training step of the Multi30k model. This one keeps an element where a 16-bit draw
reaches a threshold: the drop probability is p rounded to a multiple of 1/65536 and the kept values are
scaled by the exact inverse of the keep probability, so the expected output equals the input.

On float32 CPU tensors a C kernel (``csrc/dropout.c``, built on first use by ``clib.py``) draws each element's
16 bits from a hash of its index and a seed taken from torch's generator, and writes the output in one pass;
the backward pass makes the same mask again from the seed. ATen's way, a tensor of random bits, a comparison
and two products each way, took 3.0 ms forward and backward over a Multi30k batch's [3,900, 256] embeddings
(Intel Xeon, 2 threads), four times a training step. Elsewhere (other types, ``SEQ2SEQ_DROPOUT_KERNEL=0``, no
compiler) the bits come from ``torch.randint``, 64 per four elements; on CUDA and in evaluation it is F.dropout.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from seq2seq.models import clib
from seq2seq.models.clib import FLOAT, INT, POINTER

LEVELS = 1 << 16  # a mask element is 16 random bits
PARALLEL_ELEMENTS = 2**16  # fewer elements than this run on one thread


class _Kernel:
    """The loaded library's function: input, output, seed, n, dropped levels, scale, threads."""

    def __init__(self, library: ctypes.CDLL):
        self.apply = clib.declare(library.dropout_apply, [POINTER, POINTER, ctypes.c_uint64, INT, INT, FLOAT, INT])


LIBRARY = clib.Library("dropout.c", "SEQ2SEQ_DROPOUT_KERNEL", "dropout", _Kernel)


def _apply(x: torch.Tensor, seed: int, dropped: int, scale: float) -> torch.Tensor:
    """x (contiguous float32) with the seed's mask applied: kept elements times ``scale``, the rest 0. The seed
    is a signed 64-bit int (an autograd Function's argument: the profiler records it as one)."""
    out = torch.empty_like(x)
    LIBRARY.get().apply(x.data_ptr(), out.data_ptr(), seed % (1 << 64), x.numel(), dropped, scale,
                        clib.threads_for(x.numel(), PARALLEL_ELEMENTS))
    return out


class _KernelDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed: int, dropped: int, scale: float):
        ctx.mask = (seed, dropped, scale)  # the backward pass draws the same mask again
        return _apply(x, seed, dropped, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _apply(grad.contiguous(), *ctx.mask), None, None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0 or x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    dropped = round(p * LEVELS)  # of the LEVELS values a 16-bit draw can take, this many drop the element
    if dropped in (0, LEVELS):
        return F.dropout(x, p, training)
    scale = LEVELS / (LEVELS - dropped)
    if LIBRARY.usable(x):
        seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64))  # from torch's generator
        if torch.is_grad_enabled() and x.requires_grad:
            return _KernelDropout.apply(x.contiguous(), seed, dropped, scale)
        return _apply(x.contiguous(), seed, dropped, scale)
    n = x.numel()
    draws = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = draws.view(torch.int16)[:n].view(x.shape)  # uniform in [-32768, 32767]
    keep = bits >= dropped - LEVELS // 2  # probability (LEVELS - dropped) / LEVELS
    return x * keep * scale


class Dropout(nn.Module):
    """nn.Dropout with the fast CPU mask of :func:`dropout`."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
