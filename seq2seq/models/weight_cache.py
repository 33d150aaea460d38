"""Weights prepared once for decoding (bfloat16 copies, oneDNN-packed output layer, the cell's weights),
kept between steps for as long as the weights they derive from are unchanged."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

# the most entries of the embedding's gate table (``embedding_gates``): 64 MiB of float32
MAX_TABLE_ELEMENTS = 2**24


class DecodingWeights(dict):
    """name -> (key, prepared weight). The key holds the source weights' versions (:func:`versions`).

    Copies (``copy.deepcopy``, as int8 quantisation makes one) start empty: the entries derive from the
    weights, and oneDNN's packed weight cannot be copied."""

    def kept(self, name, key: tuple, make: Callable):
        """``make()``, kept for as long as ``key`` holds."""
        cached = self.get(name)
        if cached is None or cached[0] != key:
            cached = self[name] = (key, make())
        return cached[1]

    def __deepcopy__(self, memo) -> "DecodingWeights":
        return DecodingWeights()


def versions(tensors: Iterable[torch.Tensor]) -> tuple:
    """What identifies the current values of these tensors (storage and in-place version counter)."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def embedding_gates(cache: DecodingWeights, embedding: torch.Tensor, w_ih: torch.Tensor, b_ih: torch.Tensor,
                    tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Decoding's layer-0 input product with the embeddings of ``tokens`` [R] -> [R, G*D], looked up in a table
    made once for the whole target vocabulary (embedding [V, E], w_ih [G*D, E]: the input weight's embedding
    columns, b_ih [G*D]) instead of a product at every step: at Multi30k's sizes that product was a fifth of a
    beam-5 step's arithmetic. None where the table would hold more than ``MAX_TABLE_ELEMENTS``."""
    if embedding.size(0) * w_ih.size(0) > MAX_TABLE_ELEMENTS:
        return None
    table = cache.kept("embedding gates", (embedding.device, *versions([embedding, w_ih, b_ih])),
                       lambda: F.linear(embedding.detach(), w_ih.detach(), b_ih.detach()))  # [V, G*D]
    return table.index_select(0, tokens)
