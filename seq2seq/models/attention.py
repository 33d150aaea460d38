"""Attention over the encoder memory: additive (Bahdanau et al. 2015), dot and general (Luong et al. 2015).

Keys are projected once per batch (``project_keys``) and passed in at every step; the modules keep
no state between calls. Padding positions get a score of -inf and so a weight of exactly 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from seq2seq.models import additive_kernel
from seq2seq.models.tanh import tanh_


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scores [B, T, S], mask [B, S] (True = real) -> weights [B, T, S]."""
    return torch.softmax(scores.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)


class AdditiveAttention(nn.Module):
    """score(q, m) = v . tanh(W_q q + W_k m)"""

    def __init__(self, query_size: int, memory_size: int, attention_size: int):
        super().__init__()
        self.key_proj = nn.Linear(memory_size, attention_size, bias=False)
        self.query_proj = nn.Linear(query_size, attention_size, bias=False)
        self.energy = nn.Linear(attention_size, 1, bias=False)

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key_proj(memory)  # [B, S, A]

    def step_gradients(self, keys: torch.Tensor, memory: torch.Tensor,
                       mask: torch.Tensor) -> Optional[additive_kernel.StepGradients]:
        """For a loop that attends once per target position to the same keys and memory (training's decoder):
        an object that stands for keys, memory and mask in ``forward`` and sums their and v's gradients over
        all steps at once (additive_kernel.StepGradients); None where the kernel would not run or no gradient
        is needed."""
        v = self.energy.weight
        if (not torch.is_grad_enabled() or type(self.energy) is not nn.Linear
                or not additive_kernel.usable(keys, v, memory)
                or not any(t.requires_grad for t in (keys, v, memory))):
            return None
        return additive_kernel.StepGradients(keys, v[0], memory, mask)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
                linear=None, steps: Optional[additive_kernel.StepGradients] = None):
        """query [B, T, Q] -> context [B, T, He], weights [B, T, S]. ``linear(x, weight)``, when given,
        computes the query's product instead of the module (bfloat16 decoding). ``steps``, when given, is
        ``step_gradients(keys, memory, mask)``, through which the kernel reads them.

        (Under bf16 autocast on the CPU the [B, T, S, A] sum and tanh run in bfloat16, 3x slower per element
        than float32 there; float32 was 2 % faster per training step, but bf16 training then peaked at
        1.68 GiB against 1.51-1.58 without it, above OpenNMT-py's 1.65, so it stays as autocast has it.)
        """
        query = self.query_proj(query) if linear is None else linear(query, self.query_proj.weight)  # [B, T, A]
        if steps is not None and additive_kernel.usable(query):
            return steps.attend(query)
        if type(self.energy) is nn.Linear and additive_kernel.usable(query, keys, self.energy.weight, memory):
            return additive_kernel.additive_attention(query, keys, self.energy.weight[0], memory, mask)
        # the same in ATen ops (other devices and types, int8, torch.compile)
        hidden = tanh_(torch.add(query[:, :, None, :], keys[:, None, :, :]))  # [B, T, S, A], tanh in place
        weights = masked_softmax(self.energy(hidden).squeeze(-1), mask)  # [B, T, S]
        return torch.bmm(weights, memory), weights


class MultiplicativeAttention(nn.Module):
    """score(q, m) = q . m (dot) or q . W m (general)"""

    def __init__(self, query_size: int, memory_size: int, general: bool):
        super().__init__()
        self.key_proj = nn.Linear(memory_size, query_size, bias=False) if general else None

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key_proj(memory) if self.key_proj is not None else memory  # [B, S, Q]

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
                linear=None):  # ``linear``: as AdditiveAttention's; this one has no per-step product
        weights = masked_softmax(torch.bmm(query, keys.transpose(1, 2)), mask)  # [B, T, S]
        return torch.bmm(weights, memory), weights
