"""Ensembles: several models decoded as one, by averaging their next-token probabilities.

:class:`Ensemble` keeps the step contract of :class:`~seq2seq.models.seq2seq.Seq2Seq` (``encode``,
``prepare_decoding``, ``init_state``, ``step``, ``select``), so greedy and beam search run it unchanged.
Its ``step`` returns log(mean_i p_i) = logsumexp_i(log_softmax_i) - log(n) as the "logits"; these are already
normalized, so the log_softmax that search applies again leaves them as they are.

All members must share the source and the target sentencepiece models (compared byte for byte).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from seq2seq.checkpoint import Bundle, ModelDirError, load_bundle


@dataclass
class EnsembleEncoderOutput:
    """One encoder output per member; ``select`` re-indexes all of them."""

    parts: tuple

    def select(self, index: torch.Tensor) -> "EnsembleEncoderOutput":
        return EnsembleEncoderOutput(tuple(part.select(index) for part in self.parts))


@dataclass
class EnsembleState:
    """One decoder state per member; ``select`` re-indexes all of them."""

    parts: tuple

    def select(self, index: torch.Tensor) -> "EnsembleState":
        return EnsembleState(tuple(part.select(index) for part in self.parts))


def average_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Members' logits, each [..., V] -> log of the mean of their softmax probabilities [..., V]."""
    log_probs = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in logits])  # [n, ..., V]
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


class Ensemble(nn.Module):
    """Several models with the same vocabularies, decoded together."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = nn.ModuleList(models)

    @property
    def has_attention(self) -> bool:
        """True when every member attends (only then is there an average attention to return)."""
        return all(m.cfg.attention != "none" for m in self.models)

    def encode(self, src: torch.Tensor, src_len: torch.Tensor, vocab: Optional[torch.Tensor] = None,
               allowed: Optional[torch.Tensor] = None) -> EnsembleEncoderOutput:
        """src [B, S], src_len [B] -> each member's encoder output (each cut to the shortlist ``vocab``)."""
        return EnsembleEncoderOutput(tuple(m.encode(src, src_len, vocab, allowed) for m in self.models))

    def prepare_decoding(self, enc: EnsembleEncoderOutput) -> EnsembleEncoderOutput:
        return EnsembleEncoderOutput(tuple(m.prepare_decoding(e) for m, e in zip(self.models, enc.parts)))

    def init_state(self, enc: EnsembleEncoderOutput) -> EnsembleState:
        return EnsembleState(tuple(m.init_state(e) for m, e in zip(self.models, enc.parts)))

    def step(self, prev_tokens: torch.Tensor, state: EnsembleState, enc: EnsembleEncoderOutput):
        """prev_tokens [B] -> (log of the mean probabilities [B, V], state, mean attention [B, S] or None)."""
        outputs = [m.step(prev_tokens, s, e) for m, s, e in zip(self.models, state.parts, enc.parts)]
        log_probs = average_log_probs([logits for logits, _, _ in outputs])
        attns = [attn for _, _, attn in outputs]
        attn: Optional[torch.Tensor] = None
        if all(a is not None for a in attns):
            attn = torch.stack([a.float() for a in attns]).mean(0)  # [B, S]
        return log_probs, EnsembleState(tuple(s for _, s, _ in outputs)), attn

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log of the mean probabilities [B, T, V] for target inputs tgt_in [B, T]."""
        return average_log_probs([m(src, src_len, tgt_in) for m in self.models])


def check_same_vocabularies(bundles: Sequence[Bundle], dirs: Sequence[str | Path]) -> None:
    """Raise ModelDirError unless every bundle has the first one's source and target sentencepiece models."""
    first = bundles[0]
    for bundle, directory in zip(bundles[1:], dirs[1:]):
        for side in ("src", "tgt"):
            if getattr(bundle, f"{side}_tokenizer").model_proto != getattr(first, f"{side}_tokenizer").model_proto:
                name = "source" if side == "src" else "target"
                raise ModelDirError(f"{dirs[0]} and {directory} have different {name} vocabularies "
                                    "(sentencepiece models); only models trained with the same ones can be ensembled")


def load_ensemble(dirs: Sequence[str | Path], device: str | torch.device = "cpu") -> Bundle:
    """Load several model directories as one Bundle: an Ensemble with the first directory's config and
    tokenizers."""
    if not dirs:
        raise ModelDirError("no model directory given")
    bundles = [load_bundle(d, device) for d in dirs]
    check_same_vocabularies(bundles, dirs)
    first = bundles[0]
    return Bundle(Ensemble([b.model for b in bundles]).eval(), first.config, first.src_tokenizer, first.tgt_tokenizer)
