"""Lexical shortlists: each batch's output layer cut to the target tokens its source words can translate to.

As Marian's lexical shortlist and CTranslate2's vocabulary map: the output layer and its softmax are most
of a decoding step (an [8,000 x 256] product per hypothesis on Multi30k), yet a batch of sentences only
ever needs a small part of the vocabulary. :func:`lexical_table` estimates p(target token | source token)
with IBM Model 1 (EM over the training pairs, a NULL source word for tokens that translate nothing); a
:class:`Shortlist` keeps, per source token, its ``candidates`` most probable target tokens, plus the
``frequent`` most frequent target tokens and NULL's candidates. For a batch, :meth:`Shortlist.for_batch`
gives the union of those, sorted (so the special tokens keep their ids), topped up with the next most
frequent tokens to a multiple of 64 (the block width of beam search's candidate selection), and each
sentence's own part of it.

Decoding then computes logits over that subset only (``search(..., vocab=, allowed=)``) and each sentence's
softmax over its own part: the same model, with probabilities renormalised over the sentence's shortlist,
so that a translation does not depend on its batch. Its BLEU cost and speed are in the README.

``seq2seq-shortlist --model DIR [--src FILE --tgt FILE]`` builds ``DIR/shortlist.safetensors`` from the
model's training data (or the given files); ``seq2seq-translate --shortlist`` uses it.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from seq2seq.checkpoint import SHORTLIST_FILE, ModelDirError, atomic_write_bytes
from seq2seq.tokenizer import EOS_ID, PAD_ID

log = logging.getLogger(__name__)

SUBSET_MULTIPLE = 64  # a batch's vocabulary is a multiple of this many tokens (search's block width)
NULL_ID = PAD_ID  # the NULL source word of IBM Model 1 (padding never occurs inside a source sentence)


def _alignment_links(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]]):
    """Every (source position, target position) link of each pair, NULL and EOS included:
    (source tokens [n], target tokens [n], target position of each link [n]) over positions numbered
    across the pairs."""
    src_lists = [[NULL_ID, *s] for s in src_ids]
    tgt_lists = [[*t, EOS_ID] for t in tgt_ids]
    src_len = torch.tensor([len(s) for s in src_lists])  # [P]
    tgt_len = torch.tensor([len(t) for t in tgt_lists])  # [P]
    src_flat = torch.tensor([x for s in src_lists for x in s])
    tgt_flat = torch.tensor([x for t in tgt_lists for x in t])
    src_start = src_len.cumsum(0) - src_len  # [P]
    links = src_len.repeat_interleave(tgt_len)  # [T] links of each target position: its sentence's source length
    position = torch.arange(tgt_flat.numel()).repeat_interleave(links)  # [n] the target position of each link
    first = (links.cumsum(0) - links).repeat_interleave(links)  # [n] where its target position's links begin
    offset = torch.arange(position.numel()) - first  # [n] source position within the sentence
    source = src_start.repeat_interleave(tgt_len).repeat_interleave(links) + offset
    return src_flat[source], tgt_flat[position], position


def lexical_table(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], tgt_vocab: int,
                  iterations: int = 5, chunk: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    """IBM Model 1 over token-id pairs: (pairs [m] = source id * tgt_vocab + target id, p(target | source) [m]).

    Only co-occurring pairs are kept (sparse). Pairs are processed ``chunk`` at a time, so memory grows
    with the number of distinct pairs, not with the corpus."""
    if not src_ids:
        raise ValueError("a lexical table needs at least one sentence pair")
    chunks = [(src_ids[i:i + chunk], tgt_ids[i:i + chunk]) for i in range(0, len(src_ids), chunk)]
    keys = torch.unique(torch.cat([torch.unique(s * tgt_vocab + t) for s, t, _ in
                                   (_alignment_links(*c) for c in chunks)]))  # [m] sorted
    prob = torch.ones(keys.numel())  # uniform start (normalised within each target position below)
    source_of = torch.div(keys, tgt_vocab, rounding_mode="floor")
    for _ in range(iterations):
        counts = torch.zeros_like(prob)
        for pair_chunk in chunks:
            src, tgt, position = _alignment_links(*pair_chunk)
            index = torch.searchsorted(keys, src * tgt_vocab + tgt)  # [n]
            p = prob[index]
            total = torch.zeros(int(position[-1]) + 1).index_add_(0, position, p)  # per target position
            counts.index_add_(0, index, p / total[position])  # expected link counts
        per_source = torch.zeros(int(source_of.max()) + 1).index_add_(0, source_of, counts)
        prob = counts / per_source[source_of]
    return keys, prob


@dataclass
class Shortlist:
    candidates: torch.Tensor  # [source vocabulary, k] each source token's likeliest target tokens (PAD-filled)
    by_frequency: torch.Tensor  # [target vocabulary] target ids, most frequent in the training data first
    frequent: int  # this many of ``by_frequency`` are in every batch's vocabulary

    @classmethod
    def build(cls, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], src_vocab: int,
              tgt_vocab: int, candidates: int = 10, frequent: int = 100, iterations: int = 5) -> "Shortlist":
        keys, prob = lexical_table(src_ids, tgt_ids, tgt_vocab, iterations)
        source, target = torch.div(keys, tgt_vocab, rounding_mode="floor"), keys % tgt_vocab
        order = prob.argsort(descending=True, stable=True)
        order = order[source[order].argsort(stable=True)]  # by source, each source's likeliest first
        counts = torch.bincount(source, minlength=src_vocab)
        rank = torch.arange(order.numel()) - (counts.cumsum(0) - counts)[source[order]]
        keep = order[rank < candidates]
        table = torch.full((src_vocab, candidates), PAD_ID, dtype=torch.long)
        table[source[keep], rank[rank < candidates]] = target[keep]
        tokens = torch.tensor([x for t in tgt_ids for x in t] + [EOS_ID] * len(tgt_ids), dtype=torch.long)
        by_frequency = torch.bincount(tokens, minlength=tgt_vocab).argsort(descending=True, stable=True)
        return cls(table, by_frequency, frequent)

    def sentence_sets(self, src: torch.Tensor) -> torch.Tensor:
        """Source ids [B, S] (padding included; 1-D: one sentence) -> [B, target vocabulary] bool, each sentence's
        own shortlist: the special tokens (ids 0-3), the frequent tokens, NULL's and its tokens' candidates."""
        src = src.cpu().reshape(src.size(0) if src.dim() > 1 else 1, -1)
        common = torch.zeros(self.by_frequency.numel(), dtype=torch.bool)
        common[: EOS_ID + 1] = True
        common[self.by_frequency[: self.frequent]] = True
        common[self.candidates[NULL_ID]] = True
        own = common.repeat(src.size(0), 1)  # [B, V]
        return own.scatter_(1, self.candidates[src].reshape(src.size(0), -1), True)

    def for_batch(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source ids [B, S] -> (the batch's vocabulary [V'], sorted ascending: the union of its sentences'
        shortlists topped up with the next most frequent tokens to a multiple of SUBSET_MULTIPLE; and [B, V']
        bool, each sentence's own part of it)."""
        own = self.sentence_sets(src)
        chosen = own.any(0)
        tgt_vocab = chosen.numel()
        size = -(-int(chosen.sum()) // SUBSET_MULTIPLE) * SUBSET_MULTIPLE
        if size >= tgt_vocab:
            return torch.arange(tgt_vocab), own
        chosen[self.by_frequency[~chosen[self.by_frequency]][: size - int(chosen.sum())]] = True
        vocab = chosen.nonzero().squeeze(1)
        return vocab, own[:, vocab]

    def save(self, path: str | Path) -> None:
        tensors = {"candidates": self.candidates.contiguous(), "by_frequency": self.by_frequency.contiguous()}
        atomic_write_bytes(Path(path), save_tensors(tensors, metadata={"frequent": str(self.frequent)}))

    @classmethod
    def load(cls, path: str | Path, src_vocab: int, tgt_vocab: int) -> "Shortlist":
        """Read a saved shortlist and check it fits the model's vocabularies (ModelDirError if not)."""
        path = Path(path)
        if not path.is_file():
            raise ModelDirError(f"{path}: no shortlist; build one with seq2seq-shortlist --model {path.parent}")
        try:
            with safe_open(str(path), "pt") as f:
                frequent = int((f.metadata() or {})["frequent"])
                shortlist = cls(f.get_tensor("candidates").long(), f.get_tensor("by_frequency").long(), frequent)
        except (SafetensorError, KeyError, ValueError, OSError) as err:
            raise ModelDirError(f"{path}: damaged or not a shortlist ({str(err)[:200]}); rebuild it with "
                                f"seq2seq-shortlist --model {path.parent}") from None
        if shortlist.candidates.size(0) != src_vocab or shortlist.by_frequency.numel() != tgt_vocab:
            raise ModelDirError(f"{path}: built for vocabularies of {shortlist.candidates.size(0)} / "
                                f"{shortlist.by_frequency.numel()} tokens, the model has {src_vocab} / {tgt_vocab}; "
                                f"rebuild it with seq2seq-shortlist --model {path.parent}")
        return shortlist

    @classmethod
    def of_model(cls, model_dir: str | Path, src_vocab: int, tgt_vocab: int) -> "Shortlist":
        """The model directory's shortlist (:meth:`load` of ``model_dir/shortlist.safetensors``)."""
        return cls.load(Path(model_dir) / SHORTLIST_FILE, src_vocab, tgt_vocab)


def build_for_model(model_dir: str | Path, src_path: Optional[str] = None, tgt_path: Optional[str] = None,
                    candidates: int = 10, frequent: int = 100, iterations: int = 5) -> Path:
    """Build ``model_dir/shortlist.safetensors`` from the model's training split (or the given text files)."""
    from seq2seq.checkpoint import load_bundle
    from seq2seq.config import ConfigError
    from seq2seq.data import DataError, load_split, read_text_pair

    bundle = load_bundle(model_dir)
    data = bundle.config.data
    if (src_path is None) != (tgt_path is None):
        raise ConfigError("give both --src and --tgt, or neither (the model's training split)")
    pairs = read_text_pair(Path(src_path), Path(tgt_path)) if src_path else load_split(data, data.train_split)
    if not pairs:
        raise DataError(f"no sentence pairs in {src_path or data.path} to build a shortlist from")
    limit = data.truncate_len
    src_ids = [s[:limit] for s in bundle.src_tokenizer.encode([s for s, _ in pairs])]
    tgt_ids = [t[:limit] for t in bundle.tgt_tokenizer.encode([t for _, t in pairs])]
    log.info("IBM Model 1 over %d pairs, %d iterations", len(pairs), iterations)
    shortlist = Shortlist.build(src_ids, tgt_ids, len(bundle.src_tokenizer), len(bundle.tgt_tokenizer),
                                candidates, frequent, iterations)
    path = Path(model_dir) / SHORTLIST_FILE
    shortlist.save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    from seq2seq.cli import USER_ERRORS, fail

    parser = argparse.ArgumentParser(prog="seq2seq-shortlist",
                                     description="Build a model directory's lexical shortlist (translate --shortlist).")
    parser.add_argument("--model", required=True, help="model directory written by training")
    parser.add_argument("--src", help="source side of the parallel text (default: the model's training split)")
    parser.add_argument("--tgt", help="target side, line by line with --src")
    parser.add_argument("--candidates", type=int, default=10, help="target tokens kept per source token (10)")
    parser.add_argument("--frequent", type=int, default=100, help="most frequent target tokens always kept (100)")
    parser.add_argument("--iterations", type=int, default=5, help="EM iterations of IBM Model 1 (5)")
    args = parser.parse_args(argv)
    for name in ("candidates", "iterations"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.frequent < 0:
        fail(f"--frequent must be at least 0, got {args.frequent}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build_for_model(args.model, args.src, args.tgt, args.candidates, args.frequent, args.iterations)
    except USER_ERRORS as err:
        fail(str(err))
    print(f"wrote {path}")
