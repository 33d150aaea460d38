"""Batches of padded id tensors, and token-based length bucketing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass
class Batch:
    src: torch.Tensor  # [B, S] source ids, padded with PAD_ID
    src_len: torch.Tensor  # [B]
    index: torch.Tensor  # [B] position of each sentence in the list it came from
    tgt_in: Optional[torch.Tensor] = None  # [B, T] BOS + target
    tgt_out: Optional[torch.Tensor] = None  # [B, T] target + EOS
    num_tgt_tokens: int = 0  # real target tokens (with EOS, without padding)

    def to(self, device: torch.device | str) -> "Batch":
        non_blocking = torch.device(device).type == "cuda"

        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if t is None:
                return None
            if non_blocking:
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)

        return Batch(move(self.src), move(self.src_len), self.index, move(self.tgt_in), move(self.tgt_out),
                     self.num_tgt_tokens)


def pad(seqs: Sequence[Sequence[int]], prefix: Sequence[int] = (), suffix: Sequence[int] = ()) -> torch.Tensor:
    """[B, width] ids, PAD_ID on the right; one tensor built from one padded list (no per-row tensors)."""
    rows = [[*prefix, *seq, *suffix] for seq in seqs]
    width = max(len(row) for row in rows)
    return torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows], dtype=torch.long)


def make_batch(src_ids: Sequence[Sequence[int]], tgt_ids: Optional[Sequence[Sequence[int]]] = None,
               index: Optional[Sequence[int]] = None) -> Batch:
    """Pad a list of id sequences (sources never empty: an empty source becomes a lone EOS)."""
    src_ids = [list(s) if len(s) else [EOS_ID] for s in src_ids]
    index = torch.tensor(list(index) if index is not None else range(len(src_ids)), dtype=torch.long)
    batch = Batch(pad(src_ids), torch.tensor([len(s) for s in src_ids]), index)
    if tgt_ids is not None:
        batch.tgt_in = pad(tgt_ids, prefix=[BOS_ID])
        batch.tgt_out = pad(tgt_ids, suffix=[EOS_ID])
        batch.num_tgt_tokens = sum(len(t) + 1 for t in tgt_ids)
    return batch


def token_batches(src_lens: Sequence[int], tgt_lens: Sequence[int], batch_tokens: int,
                  seed: int, epoch: int, multiple: int = 1) -> list[list[int]]:
    """Split example indices into batches of about ``batch_tokens`` target tokens (with EOS).

    Sentences of similar length go together (sorted by target then source length, ties broken at
    random), batches come in random order, and every example is in exactly one batch. Sources run up
    within one target length and down within the next, so that a batch that straddles two target lengths
    takes sources of similar length from both, not the longest of one and the shortest of the other: on
    Multi30k the padded source positions of the encoder fell from 19.5 % to 11.9 % of the real ones, and
    the attention's [B, T, S] work over padding from 22 % to 14 %. A full batch
    keeps a multiple of ``multiple`` sentences (where it has that many) and hands the rest on to the
    next: fewer distinct tensor shapes, which pays where kernels are built per shape (oneDNN in
    bfloat16) or want aligned sizes (tensor cores). The result depends only on (seed, epoch), so a
    resumed run sees the same batches.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    tiebreak = torch.randperm(len(tgt_lens), generator=generator).tolist()
    rank = {length: r for r, length in enumerate(sorted(set(tgt_lens)))}  # sources up at even ranks, down at odd
    order = sorted(range(len(tgt_lens)),
                   key=lambda i: (tgt_lens[i], -src_lens[i] if rank[tgt_lens[i]] % 2 else src_lens[i], tiebreak[i]))
    batches, current = [], []
    for i in order:
        width = tgt_lens[i] + 1  # sorted by target length: the newest sentence is the widest
        if current and width * (len(current) + 1) > batch_tokens:
            cut = len(current) // multiple * multiple or len(current)
            batches.append(current[:cut])
            current = current[cut:]
        current.append(i)
    if current:
        batches.append(current)
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def sentence_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first) and cut into batches of ``batch_size`` sentences."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
