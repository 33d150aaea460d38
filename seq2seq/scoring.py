"""Forced decoding: the log-probability a model gives to given target sentences.

The target is fed with teacher forcing in batches (``model(src, src_len, tgt_in)``); each token's
log-probability is read from the log_softmax of the logits, EOS included. These are the same numbers
that greedy and beam search add up, so scoring a search's own output gives back its score (for an
output that stopped at the maximum length without EOS, the search score lacks the final EOS term).

``seq2seq-score --model DIR --src FILE --tgt FILE`` prints, per pair and in input order:
total log-probability<TAB>target tokens (EOS included)<TAB>average per token.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from seq2seq.batch import make_batch, sentence_batches
from seq2seq.cli import USER_ERRORS, fail
from seq2seq.data import read_text_pair
from seq2seq.runtime import set_threads
from seq2seq.translate import Translator


@torch.no_grad()
def token_log_probs(model: nn.Module, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]],
                    device: torch.device | str = "cpu", batch_size: int = 64) -> list[list[float]]:
    """Per pair, the log-probability of each target token and of the final EOS (len(tgt) + 1 values).
    Ids exclude BOS/EOS; an empty source is read as a lone EOS, as in translation."""
    model.eval()
    results: list[list[float]] = [[] for _ in src_ids]
    for group in sentence_batches([len(s) for s in src_ids], batch_size):
        batch = make_batch([src_ids[g] for g in group], [tgt_ids[g] for g in group]).to(device)
        logits = model(batch.src, batch.src_len, batch.tgt_in)  # [B, T, V]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        picked = log_probs.gather(2, batch.tgt_out.unsqueeze(2)).squeeze(2).cpu()  # [B, T]
        for row, g in enumerate(group):
            results[g] = picked[row, : len(tgt_ids[g]) + 1].tolist()
    return results


def score_pairs(translator: Translator, pairs: Sequence[tuple[str, str]]) -> list[list[float]]:
    """Token log-probabilities of each (source, target) text pair under the translator's model; sources
    are cut to data.truncate_len pieces as in translation."""
    src_tok, tgt_tok = translator.bundle.src_tokenizer, translator.bundle.tgt_tokenizer
    src_ids = [ids[: translator.max_src_len] for ids in src_tok.encode([s.strip() for s, _ in pairs])]
    tgt_ids = tgt_tok.encode([t.strip() for _, t in pairs])
    return token_log_probs(translator.model, src_ids, tgt_ids, translator.device, translator.search_cfg.batch_size)


def format_score(values: Sequence[float]) -> str:
    """total<TAB>tokens<TAB>average"""
    total = sum(values)
    return f"{total:.4f}\t{len(values)}\t{total / len(values):.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="seq2seq-score", description=(
        "Score reference translations under a model (forced decoding): print per line "
        "total log-probability<TAB>target tokens (EOS included)<TAB>average per token."))
    parser.add_argument("--model", required=True, nargs="+", help="model directory (several: an ensemble)")
    parser.add_argument("--src", required=True, help="source file")
    parser.add_argument("--tgt", required=True, help="target file, line-aligned with --src")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences per batch (default: the model's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.batch_size is not None and args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    set_threads(args.threads)
    try:
        pairs = read_text_pair(Path(args.src), Path(args.tgt))
        translator = Translator.from_dirs(args.model, device=args.device, batch_size=args.batch_size)
        scores = score_pairs(translator, pairs)
    except USER_ERRORS as err:
        fail(str(err))
    sys.stdout.writelines(format_score(values) + "\n" for values in scores)
