"""Corpus scores with sacreBLEU, always reported with their signatures."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF


@dataclass
class Score:
    name: str
    score: float
    signature: str
    text: str  # sacreBLEU's own one-line rendering

    def to_dict(self) -> dict:
        return {"name": self.name, "score": round(self.score, 2), "signature": self.signature, "text": self.text}


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> Score:
    """Detokenised, cased BLEU with the 13a tokeniser."""
    metric = BLEU()
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return Score("BLEU", result.score, str(metric.get_signature()), str(result))


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> Score:
    metric = CHRF()
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return Score("chrF2", result.score, str(metric.get_signature()), str(result))
