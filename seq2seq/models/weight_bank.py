"""Per-step products whose weight gradient is one matrix product per batch, not one per time step.

A decoder uses the same weights at every target position. Autograd then computes each position's
weight gradient on its own (a [out, B] x [B, in] product with B, the batch's sentences, as its inner
size) and adds it to the running sum: T small products and T additions of a whole weight matrix.
:class:`WeightBank` stores each position's input and output gradient instead and, once autograd has
been through every position, forms the weight gradient as one [out, B*T] x [B*T, in] product.

How: the bank's weight enters the graph through :class:`_Collect`, whose output (a 0-dim token) every
position's :class:`_BankedLinear` takes as an input. Autograd runs a node only after all its
consumers, so ``_Collect.backward`` runs after every position's backward has filled the bank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class _Collect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, bank):
        ctx.bank, ctx.has_bias = bank, bias is not None
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad):
        bank = ctx.bank
        inputs, grads = torch.cat(bank.inputs), torch.cat(bank.grads)  # [N, in], [N, out]
        bank.inputs, bank.grads = [], []
        grad_weight = torch.mm(grads.t(), inputs).to(bank.weight.dtype)
        grad_bias = grads.sum(0, dtype=torch.float32).to(bank.bias.dtype) if ctx.has_bias else None
        return grad_weight, grad_bias, None


class _BankedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, token, bank):
        ctx.bank = bank
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        ctx.bank.inputs.append(x.reshape(-1, x.size(-1)))
        ctx.bank.grads.append(grad_out.reshape(-1, grad_out.size(-1)))
        grad_x = torch.matmul(grad_out, weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_out.new_zeros(()), None


class WeightBank:
    """``bank(x)`` = F.linear(x, weight, bias) for one batch's forward pass, with the weight gradient
    formed once. Under autocast the weight is cast once here, and products run in that type."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        device = weight.device.type
        self.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        self.weight = weight.to(self.dtype)
        self.bias = None if bias is None else bias.to(self.dtype)
        self.inputs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.token = _Collect.apply(self.weight, self.bias, self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the type is chosen here
            return _BankedLinear.apply(x.to(self.dtype), self.weight.detach(),
                                       None if self.bias is None else self.bias.detach(), self.token, self)
