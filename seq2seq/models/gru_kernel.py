"""The GRU cell's elementwise half as one C kernel each way on float32 CPU tensors (``csrc/gru_cell.c``).

Given the input's and the state's products (gates_in = W_ih x + b_ih, gates_h = W_hh h + b_hh), a GRU step is
r = sigmoid(i_r + h_r), z = sigmoid(i_z + h_z), n = tanh(i_n + r h_n), h' = n + z (h - n). ATen runs that as a
dozen elementwise operations forward and two dozen backward, each a dispatch, an autograd node and a pass over
memory: ~580 us per step at 160 sentences x 256 (AMD EPYC, 2 threads), a few percent of a training step in the
decoder and as much again in the encoder. The kernel does it in one pass each way and saves r, z, n and h_n for
the backward pass. The decoder's cell (``cell.rnn_cell_step``) and the encoder's GRU (``encoder.gru_layer``) use it
where it can be used (``clib.py``: built on first use; ``SEQ2SEQ_GRU_KERNEL=0`` turns it off), ATen otherwise,
with the same results within float rounding (tests); the encoder runs each direction's whole recurrence as one
autograd node (``gru_recurrence``).
"""
from __future__ import annotations

import ctypes

import torch
from torch.autograd.function import once_differentiable

from seq2seq.models import clib
from seq2seq.models.clib import INT, POINTER

PARALLEL_ELEMENTS = 2**14  # fewer [B, H] elements than this run on one thread


class _Kernel:
    """The loaded library's two functions: tensors' addresses (and row strides), then B, H, threads."""

    def __init__(self, library: ctypes.CDLL):
        self.forward = clib.declare(library.gru_cell_forward, [POINTER, INT] + [POINTER] * 4 + [INT] * 3)
        self.backward = clib.declare(library.gru_cell_backward, [POINTER, INT] + [POINTER] * 4 + [INT]
                                     + [POINTER] * 2 + [INT] * 3)


LIBRARY = clib.Library("gru_cell.c", "SEQ2SEQ_GRU_KERNEL", "GRU cell", _Kernel)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: float32 on the CPU, outside torch.compile, and built."""
    return LIBRARY.usable(*tensors)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """[B, N] with contiguous rows (a time step of a [B, T, N] tensor is one), else a contiguous copy."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _forward(gates_in: torch.Tensor, gates_h: torch.Tensor, h: torch.Tensor) -> tuple:
    """-> (h' [B, H], saved [B, 4H]); the shapes are checked here, as the kernel reads raw memory."""
    batch, size = h.shape
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (gates_in, gates_h, h)):
        raise ValueError("GRU cell: the kernel takes float32 CPU tensors (check gru_kernel.usable first)")
    if gates_in.shape != (batch, 3 * size) or gates_h.shape != (batch, 3 * size):
        raise ValueError(f"GRU cell: gates_in {tuple(gates_in.shape)}, gates_h {tuple(gates_h.shape)} and h "
                         f"{tuple(h.shape)} do not fit [B, 3H], [B, 3H], [B, H]")
    gates_in, gates_h, h = _rows(gates_in), gates_h.contiguous(), h.contiguous()
    h_new, saved = torch.empty_like(h), h.new_empty(batch, 4 * size)
    step_into(gates_in, gates_h, h, h_new, saved)
    return h_new, saved


def step_into(gates_in, gates_h, h, h_new, saved) -> None:
    """The kernel's forward pass into given buffers, shapes as checked by the callers: gates_in [B, 3H] (rows
    contiguous, stride(0) apart), gates_h [B, 3H], h and h_new [B, H], saved [B, 4H] (contiguous)."""
    batch, size = h.shape
    LIBRARY.get().forward(gates_in.data_ptr(), gates_in.stride(0), gates_h.data_ptr(), h.data_ptr(),
                          h_new.data_ptr(), saved.data_ptr(), batch, size,
                          clib.threads_for(batch * size, PARALLEL_ELEMENTS))


def step_backward_into(grad_h_new, carry, h, saved, grad_gates_in, grad_gates_h, grad_h) -> None:
    """The kernel's backward pass into given buffers: grad_h_new [B, H] plus carry [B, H] (None: 0; the
    state's gradient from the next step) -> grad_gates_in, grad_gates_h [B, 3H], grad_h [B, H] (written).
    grad_h_new's and grad_gates_in's rows are contiguous, stride(0) apart; the rest contiguous."""
    batch, size = h.shape
    LIBRARY.get().backward(grad_h_new.data_ptr(), grad_h_new.stride(0), None if carry is None else carry.data_ptr(),
                           h.data_ptr(), saved.data_ptr(), grad_gates_in.data_ptr(), grad_gates_in.stride(0),
                           grad_gates_h.data_ptr(), grad_h.data_ptr(), batch, size,
                           clib.threads_for(batch * size, PARALLEL_ELEMENTS))


class GRUCellFunction(torch.autograd.Function):
    """gates_in [B, 3H] (rows contiguous), gates_h [B, 3H], h [B, H] -> h' [B, H]."""

    @staticmethod
    def forward(ctx, gates_in, gates_h, h):
        h_new, saved = _forward(gates_in, gates_h, h)
        ctx.save_for_backward(h.contiguous(), saved)
        return h_new

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h_new):
        h, saved = ctx.saved_tensors
        grad_h_new = grad_h_new.contiguous()
        batch, size = h.shape
        grad_in, grad_h_gates, grad_h = h.new_empty(batch, 3 * size), h.new_empty(batch, 3 * size), torch.empty_like(h)
        step_backward_into(grad_h_new, None, h, saved, grad_in, grad_h_gates, grad_h)
        return grad_in, grad_h_gates, grad_h


def gru_cell(gates_in: torch.Tensor, gates_h: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The GRU's new state h' [B, H] from gates_in, gates_h [B, 3H] and h [B, H] (autograd where a gradient is
    needed)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (gates_in, gates_h, h)):
        return GRUCellFunction.apply(gates_in, gates_h, h)
    return _forward(gates_in, gates_h, h)[0]


class GRURecurrence(torch.autograd.Function):
    """A GRU layer's recurrence from a zero state over a whole sequence as one autograd node: gates_in [B, S, 3H]
    (the input's product with its bias, for all positions), w_hh [3H, H], b_hh [3H] -> outputs [B, S, H].

    Step by step, autograd recorded a product, the cell and their gradients' bookkeeping per step: a node for
    each, the weight's gradient as a small product and an addition per step, and the gates' gradient stacked
    from per-step pieces at the end. Here the forward pass runs the state's product and the cell kernel per
    step into buffers for the whole sequence, and the backward pass runs the steps in reverse, the kernel
    writing the gates' gradients straight into their [B, S, 3H] and [S, B, 3H] buffers and adding the next
    step's share of the state's gradient itself; w_hh's gradient is then one product over all steps."""

    @staticmethod
    def forward(ctx, gates_in, w_hh, b_hh):
        batch, length, size = gates_in.size(0), gates_in.size(1), w_hh.size(1)
        if gates_in.stride(-1) != 1:  # the kernel reads each row's 3H floats in a run, rows stride(0) apart
            gates_in = gates_in.contiguous()
        states = gates_in.new_empty(length + 1, batch, size)  # [S + 1, B, H]: h_0 = 0, then each step's
        states[0].zero_()
        saved = gates_in.new_empty(length, batch, 4 * size)  # what each step's backward pass needs
        for t in range(length):
            step_into(gates_in[:, t], torch.addmm(b_hh, states[t], w_hh.t()), states[t], states[t + 1], saved[t])
        ctx.save_for_backward(w_hh, states, saved)
        return states[1:].transpose(0, 1)  # [B, S, H]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_outputs):
        w_hh, states, saved = ctx.saved_tensors
        length, batch, size = saved.size(0), saved.size(1), w_hh.size(1)
        grad_outputs = grad_outputs.contiguous()  # [B, S, H]
        grad_gates_in = grad_outputs.new_empty(batch, length, 3 * size)
        grad_gates_h = grad_outputs.new_empty(length, batch, 3 * size)
        direct, carry = grad_outputs.new_empty(batch, size), None  # the state's gradient: through z, through w_hh
        for t in reversed(range(length)):
            step_backward_into(grad_outputs[:, t], carry, states[t], saved[t], grad_gates_in[:, t], grad_gates_h[t],
                               direct)
            if t:
                carry = torch.addmm(direct, grad_gates_h[t], w_hh)  # [B, H] to step t - 1
        flat_grad_h = grad_gates_h.view(-1, 3 * size)  # [S * B, 3H]
        grad_w_hh = torch.mm(flat_grad_h.t(), states[:-1].reshape(-1, size))  # h_{t-1} of every step
        return grad_gates_in, grad_w_hh, flat_grad_h.sum(0)


def gru_recurrence(gates_in: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
    """outputs [B, S, H] of a GRU layer from a zero state, given its input products gates_in [B, S, 3H]
    (:class:`GRURecurrence`; float32 CPU tensors, ``usable`` first)."""
    batch, length, size = gates_in.size(0), gates_in.size(1), w_hh.size(1)
    if gates_in.shape != (batch, length, 3 * size) or w_hh.shape != (3 * size, size) or b_hh.shape != (3 * size,):
        raise ValueError(f"GRU recurrence: gates_in {tuple(gates_in.shape)}, w_hh {tuple(w_hh.shape)} and b_hh "
                         f"{tuple(b_hh.shape)} do not fit [B, S, 3H], [3H, H], [3H]")
    return GRURecurrence.apply(gates_in, w_hh.contiguous(), b_hh.contiguous())
