"""Weights prepared once for decoding (bfloat16 copies, oneDNN-packed output layer, the cell's weights),
kept between steps for as long as the weights they derive from are unchanged."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


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
