"""The output layer's softmax and cross-entropy over a chunk of logits as one C kernel on float32 CPU tensors
(``csrc/softmax_loss.c``), for the chunked loss (``output_loss.py``).

Given a chunk's products x W^T [n, V], the loss needs the bias added, a softmax, the target's logit and
log-sum-exp, the target's share subtracted (the gradient), and the gradient's column sums for the bias: in ATen
a pass over the chunk's 33 MB each (the bias broadcast into the product's output, the softmax, gathers,
scatter_add_, sum). The kernel reads each row from memory once and writes it once, its passes in the cache, and
takes the log-sum-exp from the softmax's own maximum and sum, so no row's loss depends on a probability that
underflowed. A bfloat16 product's logits are read as they are and its gradient written in bfloat16, in float32
within. Built on first use (``clib.py``); ``SEQ2SEQ_LOSS_KERNEL=0`` turns it off, and then, without a compiler
and on GPUs, ATen computes the same loss (tests).
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from seq2seq.models import clib
from seq2seq.models.clib import FLOAT, INT, POINTER

ROWS_PER_PART = 64  # as in the C file: the bias's gradient comes in one part per this many rows
PARALLEL_ELEMENTS = 2**15  # fewer logits than this run on one thread


class _Kernel:
    """The loaded library's functions: logits, bias, target, the target's share, lse, target logit, logit sum,
    bias parts, (bfloat16: the gradient's output,) then N, V and the thread count."""

    def __init__(self, library: ctypes.CDLL):
        self.softmax_loss = clib.declare(library.softmax_loss, [POINTER] * 3 + [FLOAT] + [POINTER] * 4 + [INT] * 3)
        self.softmax_loss_bf16 = clib.declare(library.softmax_loss_bf16,
                                              [POINTER] * 3 + [FLOAT] + [POINTER] * 5 + [INT] * 3)
        self.softmax_loss_bf16.restype = ctypes.c_int  # nonzero: a thread's row could not be allocated


LIBRARY = clib.Library("softmax_loss.c", "SEQ2SEQ_LOSS_KERNEL", "the output layer's softmax", _Kernel)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: float32 on the CPU, outside torch.compile, and built."""
    return LIBRARY.usable(*tensors)


def softmax_loss(logits: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor, target_share: float,
                 bias_grad: bool, out: Optional[torch.Tensor] = None) -> tuple:
    """logits [n, V] (x W^T, contiguous) become softmax(logits + bias) with ``target_share`` added at each row's
    target (-1 makes them the cross-entropy's gradient; 0 leaves the softmax): in place for float32 logits;
    bfloat16 logits go into ``out`` (bfloat16 [n, V], contiguous; the logits themselves where not given),
    computed in float32 and rounded once.

    -> (log-sum-exp [n], target logit [n], sum of the row's logits [n] (label smoothing's mean logit times V),
    with ``bias_grad`` the result's column sums [V], else None), float32; logits and sums include the bias."""
    rows, vocab = logits.shape
    low = logits.dtype == torch.bfloat16
    out = logits if out is None else out
    if (not logits.is_contiguous() or target.shape != (rows,) or (bias is not None and bias.shape != (vocab,))
            or not out.is_contiguous() or out.shape != logits.shape):
        raise ValueError(f"softmax loss: logits {tuple(logits.shape)} (contiguous: {logits.is_contiguous()}), "
                         f"target {tuple(target.shape)}, bias {None if bias is None else tuple(bias.shape)} and "
                         f"out {tuple(out.shape)} do not fit [n, V] (contiguous), [n], [V], [n, V] (contiguous)")
    if (logits.dtype not in (torch.float32, torch.bfloat16) or out.dtype != logits.dtype
            or any(t.device.type != "cpu" for t in (logits, out)) or (bias is not None and (
                bias.dtype != torch.float32 or bias.device.type != "cpu"))):
        raise ValueError("softmax loss: the kernel takes float32 or bfloat16 logits (and out) and a float32 bias "
                         "on the CPU (check loss_kernel.usable first)")
    if not low and out is not logits:
        raise ValueError("softmax loss: float32 logits are turned into the result in place (out is for bfloat16)")
    target = target.to(torch.int64).contiguous()
    if rows and (int(target.min()) < 0 or int(target.max()) >= vocab):  # the kernel writes at these positions
        raise IndexError(f"softmax loss: a target id outside the vocabulary of {vocab}")
    bias = None if bias is None else bias.contiguous()
    lse, target_logit, logit_sum = (torch.empty(rows) for _ in range(3))
    parts = torch.empty(-(-rows // ROWS_PER_PART), vocab) if bias_grad else None
    pointers = (None if bias is None else bias.data_ptr(), target.data_ptr(), target_share, lse.data_ptr(),
                target_logit.data_ptr(), logit_sum.data_ptr(), None if parts is None else parts.data_ptr())
    sizes = (rows, vocab, clib.threads_for(rows * vocab, PARALLEL_ELEMENTS))
    if not low:
        LIBRARY.get().softmax_loss(logits.data_ptr(), *pointers, *sizes)
    elif LIBRARY.get().softmax_loss_bf16(logits.data_ptr(), *pointers, out.data_ptr(), *sizes):
        raise MemoryError(f"softmax loss: no memory for a row of {vocab} floats")
    return lse, target_logit, logit_sum, None if parts is None else parts.sum(0)
