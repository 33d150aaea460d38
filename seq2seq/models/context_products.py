"""Decoding's products of the attention context, taken over the encoder memory once per batch.

A decoding step multiplies the context c = sum_s a_s m_s (attention weights a [S], memory m [S, He]) by the
pre-output layer's context columns and, where the context is also the RNN's input (Bahdanau), by layer 0's
context columns: He x (D [+ G*D]) multiply-adds per hypothesis and step. A row's attention weights add up
to 1, so W c + b = sum_s a_s (W m_s + b): the memory is multiplied once per batch (``project``) and each step's
attention takes its weighted sum over those products instead of over the memory (S x (D [+ G*D]) per
hypothesis, S the source length, 15-30 on Multi30k against He = 512). The results equal the plain path's
within float rounding (tests compare the steps' logits and the translations). Training keeps the plain path:
its gradients go through the context.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.models.weight_cache import versions


def usable(decoder, memory: torch.Tensor) -> bool:
    """Whether ``decoder``'s steps can take the context's products from :func:`project`: decoding (no gradients)
    with attention, float32 products (not bf16_products, autocast or int8 layers)."""
    return (decoder.attention is not None and decoder.manual_cell and not decoder.bf16_products
            and type(decoder.pre_output) is nn.Linear and not torch.is_grad_enabled()
            and memory.dtype == torch.float32 and not torch.is_autocast_enabled(memory.device.type))


def project(decoder, memory: torch.Tensor) -> Optional[torch.Tensor]:
    """memory [B, S, He] -> its products [B, S, G*D + D] (Bahdanau: layer 0's context columns, then the
    pre-output's, whose bias is added here) or [B, S, D] (Luong: the pre-output's); None where not
    :func:`usable`."""
    if not usable(decoder, memory):
        return None
    pre_output, enc_size = decoder.pre_output, decoder.cfg.enc_hidden_size
    sources = [pre_output.weight, pre_output.bias]
    if not decoder.luong:
        sources.append(decoder.rnn.weight_ih_l0)

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        weight = pre_output.weight.detach()[:, -enc_size:]  # [D, He]: the context is the layer's last input
        bias = pre_output.bias.detach() if pre_output.bias is not None else weight.new_zeros(weight.size(0))
        if not decoder.luong:  # layer 0's input is [y; c; fed vector]; its bias comes with the embedding's share
            emb_size = decoder.cfg.emb_size
            rnn_weight = decoder.rnn.weight_ih_l0.detach()[:, emb_size:emb_size + enc_size]  # [G*D, He]
            weight, bias = torch.cat([rnn_weight, weight]), torch.cat([bias.new_zeros(rnn_weight.size(0)), bias])
        return weight.contiguous(), bias

    weight, bias = decoder._decoding_cache.kept("context products", (memory.device, *versions(sources)), make)
    return F.linear(memory, weight, bias)


def other_columns(decoder) -> torch.Tensor:
    """The pre-output weight's columns for its other inputs, [h] or [h; y], transposed: [D (+ E), D]."""
    weight = decoder.pre_output.weight
    return decoder._decoding_cache.kept("pre-output without context", versions([weight]),
                                        lambda: weight.detach()[:, :-decoder.cfg.enc_hidden_size].t().contiguous())
