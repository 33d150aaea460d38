"""oneDNN's linear layer with its weight reordered once into oneDNN's own layout (the op that torch.compile's
CPU backend uses). A plain float32 product re-packs its [out, in] weight at every call, which costs most
where the weight is large and the rows are few: the output layer ([8,000 x 256] on Multi30k) in decoding
steps (``output_logits``). The training loss's chunks gained too little from it to keep (docs/speed.md).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from seq2seq.models.weight_cache import versions

# x86 only (measured on an AMD EPYC; other CPUs take the plain product), where this torch has the ops
PACKED_LINEAR = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
PACK_ROW_MULTIPLE = 8  # the least multiple rows are padded to (``padded_rows``)


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """weight [O, I] (float32, CPU) in oneDNN's layout for products of about ``rows`` rows (any count works)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [R, I] @ weight.T + bias -> [R, O], from ``pack_weight(weight)``; no gradients flow through it."""
    rows = x.size(0)
    padded = padded_rows(rows)
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")[:rows]


def padded_rows(rows: int) -> int:
    """The row count a product of ``rows`` rows runs at: a multiple of 8 up to 64 rows, of 16 up to 128, of 32
    up to 256 and so on (under a quarter more rows), so that a decoding's shrinking batch takes a few shapes.
    oneDNN builds and keeps a kernel per row count, and every shape is another size of logits buffer:
    beam 5 of test2016 over the whole vocabulary with two workers peaked at 447-464 MiB this way against
    475-516 with multiples of 8 (three runs each), at 0.99-1.02x the speed (in-process A/Bs, docs/speed.md)."""
    multiple = PACK_ROW_MULTIPLE
    while rows > 8 * multiple:
        multiple *= 2
    return -(-rows // multiple) * multiple


def output_logits(output: torch.nn.Linear, cache, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The output layer x [..., D] -> logits [..., V] from its weight reordered once for oneDNN and kept in
    ``cache`` (a ``weight_cache.DecodingWeights``) for about ``rows`` rows. A plain product re-packs the [V, D]
    weight at every call, which costs most at the few rows of a decoding step: greedy decoding of test2016 ran
    1.15x as fast this way (AMD EPYC, float32; beam 5, with its 5x the rows, the same), with equal output.
    oneDNN keeps a kernel per row count (~1 MB each): rows padded to a multiple of 8 kept beam 5's peak
    memory as it was (unpadded: +78 MiB, greedy 1.22x); now they are padded as ``padded_rows`` says."""
    weight = output.weight
    packed = cache.kept("packed output", (weight.device, *versions([weight])), lambda: pack_weight(weight, rows))
    logits = packed_linear(x.reshape(-1, x.size(-1)), packed, output.bias)  # [R, V]
    return logits.view(*x.shape[:-1], logits.size(-1))


@dataclass
class LinearRows:
    """Some output rows of a linear layer, cut and prepared once (a batch's shortlist of the output layer):
    x [..., I] -> float32 [..., len(rows)]. On x86 CPUs the weight is kept in oneDNN's layout."""

    weight: torch.Tensor  # [O', I] float32, or its oneDNN layout where ``packed``
    bias: Optional[torch.Tensor]  # [O']
    packed: bool

    @classmethod
    def of(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: torch.Tensor, pack_rows: int) -> "LinearRows":
        """weight [O, I], bias [O], rows [O'] (indices into O); ``pack_rows`` as in :func:`pack_weight`."""
        weight = weight.detach()[rows].float().contiguous()
        bias = None if bias is None else bias.detach()[rows].float().contiguous()
        packed = PACKED_LINEAR and weight.device.type == "cpu"
        return cls(pack_weight(weight, pack_rows) if packed else weight, bias, packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1)).float()  # [R, I]
        out = packed_linear(flat, self.weight, self.bias) if self.packed else F.linear(flat, self.weight, self.bias)
        return out.view(*x.shape[:-1], out.size(-1))
