"""Translator: a loaded model directory that turns lines of text into translations, in batches.

Every input line gives exactly one output: empty and whitespace-only lines give an empty line, over-long
lines are cut to ``data.truncate_len`` pieces with a warning, and input is read in bounded chunks so
a file of any size streams through in bounded memory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from seq2seq.batch import make_batch, sentence_batches
from seq2seq.checkpoint import Bundle, load_bundle
from seq2seq.config import SearchConfig
from seq2seq.runtime import resolve_device
from seq2seq.search import Hypothesis, search

log = logging.getLogger(__name__)


@dataclass
class Translation:
    text: str
    score: float
    pieces: list[str]  # target pieces
    src_pieces: list[str]
    attention: Optional[torch.Tensor] = None  # [len(pieces) + 1, len(src_pieces)]


class Translator:
    def __init__(self, bundle: Bundle, search_cfg: Optional[SearchConfig] = None, device: str = "auto"):
        self.device = resolve_device(device)
        self.bundle = bundle
        self.model = bundle.model.to(self.device).eval()
        self.search_cfg = search_cfg or bundle.config.search
        self.search_cfg.validate()
        self.max_src_len = bundle.config.data.truncate_len

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "auto", **search_overrides) -> "Translator":
        bundle = load_bundle(model_dir)
        search_cfg = replace(bundle.config.search, **{k: v for k, v in search_overrides.items() if v is not None})
        return cls(bundle, search_cfg, device)

    def translate(self, lines: list[str], n_best: int = 1, return_attention: bool = False) -> list[list[Translation]]:
        """Translate a list of lines; each gets an n-best list (best first)."""
        src_tok, tgt_tok = self.bundle.src_tokenizer, self.bundle.tgt_tokenizer
        results: list[list[Translation]] = [[] for _ in lines]
        todo = [i for i, line in enumerate(lines) if line.strip()]
        ids = src_tok.encode([lines[i].strip() for i in todo])
        for i, seq in zip(todo, ids):
            if len(seq) > self.max_src_len:
                log.warning("line %d has %d source pieces; only the first %d are translated", i + 1, len(seq),
                            self.max_src_len)
        ids = [seq[: self.max_src_len] for seq in ids]
        for group in sentence_batches([len(s) for s in ids], self.search_cfg.batch_size):
            batch = make_batch([ids[g] for g in group]).to(self.device)
            hyps = search(self.model, batch.src, batch.src_len, self.search_cfg, n_best=n_best,
                          return_attention=return_attention)
            for g, nbest in zip(group, hyps):
                results[todo[g]] = [self._to_translation(h, ids[g]) for h in nbest[:n_best]]
        for i, line in enumerate(lines):
            if not results[i]:
                results[i] = [Translation("", 0.0, [], [])]
        return results

    def _to_translation(self, hyp: Hypothesis, src_ids: list[int]) -> Translation:
        src_tok, tgt_tok = self.bundle.src_tokenizer, self.bundle.tgt_tokenizer
        score = hyp.normalized_score if hyp.normalized_score is not None else hyp.score
        return Translation(tgt_tok.decode([hyp.tokens])[0], score, tgt_tok.id_to_piece(hyp.tokens),
                           src_tok.id_to_piece(src_ids), hyp.attention)

    def translate_stream(self, lines: Iterable[str], chunk_size: int = 0, n_best: int = 1,
                         return_attention: bool = False) -> Iterator[list[Translation]]:
        """Translate an iterable of lines chunk by chunk, yielding results in input order."""
        chunk_size = chunk_size or self.search_cfg.batch_size * 16
        iterator = iter(lines)
        while chunk := list(islice(iterator, chunk_size)):
            yield from self.translate([line.rstrip("\r\n") for line in chunk], n_best, return_attention)
