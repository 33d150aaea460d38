"""The additive attention (scores v . tanh(q + k), masked softmax, context) as one C kernel on float32 CPU tensors.

ATen forms the [B, T, S, A] sum, its tanh and the product with v as separate passes over memory, saves
the tanh for the backward pass and takes the energy's gradient as a matrix product with an inner size of 1;
the softmax and the context's batched product follow as more passes, and in training the memory's gradient
is a batched outer product per step that ran at 1-5 GFLOP/s. The kernel (``csrc/additive_attention.c``) does
each direction in one pass that keeps every element in registers, recomputes the tanh in the backward pass
instead of saving it, and skips padding: less memory in training (no saved [B, S, A] tanh per step), faster
training and decoding (docs/speed.md).

The C file is compiled on first use and loaded with ctypes (``clib.py``); without a compiler, on other devices
and types, and where ``SEQ2SEQ_ADDITIVE_KERNEL=0``, the attention takes its ATen path (the same results, within
float rounding). The kernel shares a batch's sentences out over torch's OpenMP threads (``clib.py``). A pool of
Python threads had been no faster, probably because torch's OpenMP workers spin for a while after each
operation, on the cores those threads wanted.
"""
from __future__ import annotations

import ctypes
import weakref
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from seq2seq.models import clib
from seq2seq.models.clib import INT, POINTER

PARALLEL_ELEMENTS = 2**15  # fewer [B, T, S, A] elements than this run on one thread (~15 us of work)
SENTENCES_PER_PART = 8  # as in the C file: v's gradient comes in one part per this many sentences


class _Kernel:
    """The loaded library's two functions: tensors' addresses (and the backward's ``scores_given``), then B, T,
    S, A, H and the thread count."""

    def __init__(self, library: ctypes.CDLL):
        self.forward = clib.declare(library.additive_attention_forward, [POINTER] * 7 + [INT] * 6)
        self.backward = clib.declare(library.additive_attention_backward,
                                     [POINTER] * 9 + [INT] + [POINTER] * 4 + [INT] * 6)


LIBRARY = clib.Library("additive_attention.c", "SEQ2SEQ_ADDITIVE_KERNEL", "additive attention", _Kernel)


def kernel() -> Optional[_Kernel]:
    """The kernel, built on the first call; None where it is switched off or cannot be built (logged once)."""
    return LIBRARY.get()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: float32 on the CPU, outside torch.compile, and built."""
    return LIBRARY.usable(*tensors)


def _sizes(query: torch.Tensor, memory: torch.Tensor) -> tuple:
    """B, T, S, A, H and the threads to run them on (torch's count, one for small work)."""
    (batch, steps, size), (length, width) = query.shape, memory.shape[1:]
    return batch, steps, length, size, width, clib.threads_for(batch * steps * length * size, PARALLEL_ELEMENTS)


def _forward(query, keys, v, memory, mask) -> tuple:
    """The forward pass on contiguous tensors (mask as uint8) -> (context, weights)."""
    (batch, steps, _), width = query.shape, memory.size(2)
    weights, context = query.new_empty(batch, steps, keys.size(1)), query.new_empty(batch, steps, width)
    forward_into(query, keys, v, memory, mask, weights, context)
    return context, weights


def forward_into(query, keys, v, memory, mask, weights, context) -> None:
    """The forward pass on contiguous tensors (mask as uint8) into weights [B, T, S] and context [B, T, H]. The
    kernel reads and writes raw memory, so the shapes are checked here rather than trusted."""
    (batch, steps, size), (length, width) = query.shape, memory.shape[1:]
    if (tuple(keys.shape), tuple(v.shape), tuple(mask.shape), memory.size(0), tuple(weights.shape),
            tuple(context.shape)) != ((batch, length, size), (size,), (batch, length), batch, (batch, steps, length),
                                      (batch, steps, width)):
        raise ValueError(f"additive attention: query {tuple(query.shape)}, keys {tuple(keys.shape)}, v "
                         f"{tuple(v.shape)}, memory {tuple(memory.shape)}, mask {tuple(mask.shape)}, weights "
                         f"{tuple(weights.shape)} and context {tuple(context.shape)} do not fit [B, T, A], [B, S, A], "
                         "[A], [B, S, H], [B, S], [B, T, S], [B, T, H]")
    kernel().forward(*(t.data_ptr() for t in (query, keys, v, mask, memory, weights, context)),
                     *_sizes(query, memory))


class AdditiveAttentionFunction(torch.autograd.Function):
    """query [B, T, A], keys [B, S, A], v [A], memory [B, S, H], mask [B, S] bool (True = real)
    -> context [B, T, H], weights [B, T, S] (0 at masked positions)."""

    @staticmethod
    def forward(ctx, query, keys, v, memory, mask):
        inputs = _contiguous(query, keys, v, memory, mask)
        context, weights = _forward(*inputs)
        ctx.save_for_backward(*inputs, weights)
        ctx.set_materialize_grads(False)
        return context, weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_context, grad_weights):
        query, keys, v, memory, mask, weights = ctx.saved_tensors
        grad_context, grad_weights = _incoming(weights, memory, grad_context, grad_weights)
        grad_query, grad_keys, grad_memory = torch.empty_like(query), torch.empty_like(keys), torch.empty_like(memory)
        grad_scores = torch.empty_like(weights)  # the kernel's scratch
        grad_v_parts = v_parts(query, v)
        backward_into(query, keys, v, mask, memory, weights, grad_context, grad_weights, grad_scores, False,
                      grad_query, grad_keys, grad_v_parts, grad_memory)
        return grad_query, grad_keys, grad_v_parts.sum(0), grad_memory, None


def _incoming(weights: torch.Tensor, memory: torch.Tensor, grad_context, grad_weights) -> tuple:
    """The gradients a backward pass receives, contiguous; the context's as zeros [B, T, H] where it is None."""
    grad_context = weights.new_zeros(weights.shape[:2] + memory.shape[2:]) if grad_context is None \
        else grad_context.contiguous()
    return grad_context, None if grad_weights is None else grad_weights.contiguous()


def v_parts(query: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[parts, A]: the kernel writes v's gradient in parts of SENTENCES_PER_PART sentences (summed by the caller)."""
    return v.new_empty(-(-query.size(0) // SENTENCES_PER_PART), v.size(0))


def backward_into(query, keys, v, mask, memory, weights, grad_context, grad_weights, grad_scores,
                  scores_given: bool, grad_query, grad_keys, grad_v_parts, grad_memory) -> None:
    """The kernel's backward pass; outputs given as None are not computed (see the C file)."""
    def address(t):
        return None if t is None else t.data_ptr()

    pointers = [address(t) for t in (query, keys, v, mask, memory, weights, grad_context, grad_weights, grad_scores)]
    pointers += [int(scores_given)] + [address(t) for t in (grad_query, grad_keys, grad_v_parts, grad_memory)]
    kernel().backward(*pointers, *_sizes(query, memory))


class StepGradients:
    """The attention of a loop over target positions (training's decoder, one call per step) with the same
    keys [B, S, A], v [A], memory [B, S, H] and mask [B, S] at every step.

    Each step's own backward pass would write the keys' and the memory's gradients ([B, S, A] and [B, S, H])
    for autograd to add up, a pass over 8 MB per step for a Multi30k batch that cost more than the step's
    arithmetic (docs/speed.md). Here the steps take keys, v and memory through :class:`_Sink`, which
    autograd runs after every step's backward pass: a step's backward pass computes its query's gradient and
    keeps its scores' gradient [B, T, S], and the sink computes the keys', v's and memory's gradients of all
    steps in one kernel call, summing over the steps in registers. Results equal the per-step path's within
    float rounding (tests)."""

    def __init__(self, keys: torch.Tensor, v: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor):
        self.mask = mask.contiguous().view(torch.uint8)
        self.steps = []  # per step (query, weights, grad_context, grad_scores), in forward order
        # the steps' inputs, whose gradients come from the sink. The sink's node holds this object weakly (its
        # steps' nodes hold it while the graph lives), not to make a cycle that only the garbage collector frees
        self.keys, self.v, self.memory = _Sink.apply(keys.contiguous(), v.contiguous(), memory.contiguous(),
                                                     weakref.ref(self))

    def attend(self, query: torch.Tensor) -> tuple:
        """query [B, T, A] -> (context [B, T, H], weights [B, T, S]), as :func:`additive_attention`."""
        return _StepAttention.apply(query.contiguous(), self.keys, self.v, self.memory, self)

    def gradients(self) -> tuple:
        """After every step's backward pass: the gradients of keys, v and memory over all steps (None where
        no step's backward pass ran)."""
        done = [step for step in self.steps if step[3] is not None]
        if not done:
            return None, None, None
        query, weights, grad_context, grad_scores = (torch.cat(parts, dim=1) for parts in zip(*done))
        keys, v, memory = self.keys, self.v, self.memory
        grad_keys, grad_memory, grad_v_parts = torch.empty_like(keys), torch.empty_like(memory), v_parts(query, v)
        backward_into(query, keys, v, self.mask, memory, weights, grad_context, None, grad_scores, True,
                      None, grad_keys, grad_v_parts, grad_memory)
        self.steps.clear()  # what the steps kept goes with the graph
        return grad_keys, grad_v_parts.sum(0), grad_memory


class _Sink(torch.autograd.Function):
    """keys, v, memory -> the same tensors; backward: their gradients over all steps (StepGradients)."""

    @staticmethod
    def forward(ctx, keys, v, memory, steps):  # steps: a weak reference to the StepGradients
        ctx.steps = steps
        ctx.set_materialize_grads(False)
        return keys.view_as(keys), v.view_as(v), memory.view_as(memory)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):  # grads: from uses of keys, v and memory other than the steps' (None if none)
        steps = ctx.steps()
        summed = (None, None, None) if steps is None else steps.gradients()
        total = [g if s is None else s if g is None else s + g for s, g in zip(summed, grads)]
        return (*total, None)


class _StepAttention(torch.autograd.Function):
    """One step's attention (StepGradients.attend): backward gives the query's gradient only."""

    @staticmethod
    def forward(ctx, query, keys, v, memory, steps: StepGradients):
        context, weights = _forward(query, keys, v, memory, steps.mask)
        ctx.steps, ctx.index = steps, len(steps.steps)
        steps.steps.append((query.detach(), weights.detach(), None, None))  # detached: no cycle through the node
        ctx.set_materialize_grads(False)
        return context, weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_context, grad_weights):
        steps = ctx.steps
        query, weights = steps.steps[ctx.index][:2]
        keys, v, memory = steps.keys, steps.v, steps.memory
        grad_context, grad_weights = _incoming(weights, memory, grad_context, grad_weights)
        grad_query, grad_scores = torch.empty_like(query), torch.empty_like(weights)
        backward_into(query, keys, v, steps.mask, memory, weights, grad_context, grad_weights, grad_scores, False,
                      grad_query, None, None, None)
        steps.steps[ctx.index] = (query, weights, grad_context, grad_scores)
        return grad_query, None, None, None, None


def additive_attention(query: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, memory: torch.Tensor,
                       mask: torch.Tensor) -> tuple:
    """The kernel's (context [B, T, H], weights [B, T, S]); autograd through :class:`AdditiveAttentionFunction`
    where a gradient is needed."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, keys, v, memory)):
        return AdditiveAttentionFunction.apply(query, keys, v, memory, mask)
    return _forward(*_contiguous(query, keys, v, memory, mask))


def _contiguous(query, keys, v, memory, mask) -> tuple:
    """What the kernel reads: contiguous float tensors and the mask as uint8."""
    return (query.contiguous(), keys.contiguous(), v.contiguous(), memory.contiguous(),
            mask.contiguous().view(torch.uint8))
