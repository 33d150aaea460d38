"""Decoding over the model's step contract: ``encode``, ``init_state``, ``step`` and ``select``, and where a
model has it, ``prepare_decoding`` (what only decoding steps need, added to the encoder output once per batch).

A model only has to re-index its encoder output and decoder state along the batch (``select``);
search keeps all bookkeeping in its own local variables. Finished sentences leave the batch.

Both searches honour the token constraints of :class:`SearchConfig` (see :func:`ban_tokens`):
``min_len`` (EOS forbidden before that many tokens), ``no_repeat_ngram`` (no generated n-gram twice)
and ``forbid_unk`` (never the unknown-word token). Banned tokens get a log-probability of -inf.

Lengths count generated tokens including EOS. A hypothesis that reaches its maximum length
(:func:`max_lengths`) without EOS is finished as it is: no EOS is forced and its score holds no EOS
probability, the same in greedy and beam search.

Beam search (:func:`beam_search`) runs all sentences and beams as one [B*K] batch (the encoder output
keeps one row per sentence: the model's ``step`` takes K consecutive rows to share it). At each step it
ranks the 2K best extensions of each sentence; those among the top K that end in EOS are finished,
the K best that do not end in EOS stay live (so K = 1 is exactly greedy search). When a sentence
stops is ``SearchConfig.stopping``:
- ``early`` (as OpenNMT-py and Joey NMT): once its best extension at some step has ended in EOS and
  it holds n_best finished hypotheses.
- ``bound``: once it holds n_best finished hypotheses and no live one can reach the n_best-th of
  them; a live one can only lose, as its log-probability falls and its length penalty is at most
  that of the maximum length. The n-best list equals that of running every beam to its maximum
  length (up to exact ties), at the cost of more steps.
Both rules depend on the sentence alone, so results do not depend on which sentences share the batch.

``vocab`` (a shortlist, :mod:`seq2seq.shortlist`) cuts the output layer to those target ids [V'], sorted
and starting with the special tokens, which so keep their ids: the search then runs over positions in
``vocab`` (constraints included) and maps the hypotheses' tokens back to ids at the end. ``vocab`` is the
batch's (the union of its sentences' shortlists); ``allowed`` [B, V'] keeps each sentence to its own, so that
its translation does not depend on the sentences batched with it (without it, as in Marian and CTranslate2,
it can).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from seq2seq import search_kernel
from seq2seq.config import SearchConfig
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # sum of log-probabilities, EOS included (before any length penalty)
    # [steps, src_len]: one row per generated token, EOS included (len(tokens) + 1 rows when the
    # hypothesis ended with EOS, len(tokens) when it stopped at the maximum length)
    attention: Optional[torch.Tensor] = None
    normalized_score: Optional[float] = None  # score after the length penalty (beam search)


def max_lengths(src_len: torch.Tensor, cfg: SearchConfig) -> torch.Tensor:
    """Most output tokens (EOS included) per sentence: a * src_len + b, at least 1."""
    return (src_len.float() * cfg.max_len_a + cfg.max_len_b).long().clamp(min=1)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha; the normalized score is score / penalty."""
    return ((5.0 + length) / 6.0) ** alpha


def penalty_of(cfg: SearchConfig) -> Callable[[int], float]:
    """The divisor of a hypothesis's score by its length: GNMT's with cfg.alpha, or the length itself
    (``average``: the mean log-probability per token). Both grow with length, which the stopping rule needs."""
    if cfg.length_penalty == "average":
        return float
    return lambda length: length_penalty(length, cfg.alpha)


def allowed_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] -> float32 log-probabilities with PAD and BOS (never outputs) at -inf, written over float32
    logits (a step's logits are used once; a second [R, V] buffer cost a quarter more time and its memory).

    (One fused log_softmax pass; torch.logsumexp on the CPU makes several and was 3x slower here.)
    """
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1, out=logits)
    log_probs[:, PAD_ID] = NEG_INF
    log_probs[:, BOS_ID] = NEG_INF
    return log_probs


def has_constraints(cfg: SearchConfig) -> bool:
    return cfg.min_len > 0 or cfg.no_repeat_ngram > 0 or cfg.forbid_unk


def ban_tokens(log_probs: torch.Tensor, history: torch.Tensor, cfg: SearchConfig) -> torch.Tensor:
    """Set banned tokens to -inf in place. log_probs [R, V]; history [R, t] tokens
    generated so far (BOS excluded). Returns log_probs."""
    if cfg.forbid_unk:
        log_probs[:, UNK_ID] = NEG_INF
    if history.size(1) < cfg.min_len:
        log_probs[:, EOS_ID] = NEG_INF
    n = cfg.no_repeat_ngram
    if n > 0 and history.size(1) >= n:
        ngrams = history.unfold(1, n, 1)  # [R, t - n + 1, n] every n-gram so far
        suffix = history[:, history.size(1) - n + 1:]  # [R, n - 1] what a new n-gram would start with
        match = (ngrams[:, :, : n - 1] == suffix[:, None, :]).all(-1)  # [R, t - n + 1]
        rows, cols = match.nonzero(as_tuple=True)
        log_probs[rows, ngrams[rows, cols, n - 1]] = NEG_INF
    return log_probs


def _encode(model, src: torch.Tensor, src_len: torch.Tensor, vocab: Optional[torch.Tensor],
            allowed: Optional[torch.Tensor] = None):
    if vocab is None:
        if allowed is not None:
            raise ValueError("allowed needs the batch's vocab (seq2seq.shortlist)")
        enc = model.encode(src, src_len)
    else:
        specials = torch.arange(EOS_ID + 1)
        if vocab.dim() != 1 or vocab.numel() <= EOS_ID or not torch.equal(vocab[: EOS_ID + 1].cpu(), specials):
            raise ValueError("a shortlist vocabulary is a 1-D tensor of sorted ids that starts with the special ids "
                             "0-3")
        if allowed is not None and (allowed.shape != (src.size(0), vocab.numel())
                                    or not allowed[:, : EOS_ID + 1].all()):
            raise ValueError("allowed is a [batch, len(vocab)] mask that allows the special ids 0-3")
        enc = model.encode(src, src_len, vocab, allowed)
    return model.prepare_decoding(enc) if hasattr(model, "prepare_decoding") else enc


def _to_ids(found: list[list[Hypothesis]], vocab: Optional[torch.Tensor]) -> list[list[Hypothesis]]:
    """Hypotheses' tokens from positions in a shortlist ``vocab`` back to token ids (in place)."""
    if vocab is not None:
        ids = vocab.tolist()
        for hyps in found:
            for hyp in hyps:
                hyp.tokens = [ids[token] for token in hyp.tokens]
    return found


@torch.no_grad()
def greedy_search(model, src: torch.Tensor, src_len: torch.Tensor, cfg: SearchConfig,
                  return_attention: bool = False, vocab: Optional[torch.Tensor] = None,
                  allowed: Optional[torch.Tensor] = None) -> list[list[Hypothesis]]:
    """Pick the most probable allowed token at each step; one hypothesis per sentence."""
    batch_size = src.size(0)
    enc = _encode(model, src, src_len, vocab, allowed)
    state = model.init_state(enc)
    limit = max_lengths(src_len, cfg)
    active = torch.arange(batch_size, device=src.device)  # original positions of the live sentences
    prev = torch.full((batch_size,), BOS_ID, dtype=torch.long, device=src.device)
    tokens: list[list[int]] = [[] for _ in range(batch_size)]
    scores = [0.0] * batch_size
    attns: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
    step = 0
    while active.numel():
        logits, state, attn = model.step(prev, state, enc)
        log_probs = allowed_log_probs(logits)
        if has_constraints(cfg):  # every live sentence has generated exactly `step` tokens
            history = torch.tensor([tokens[s] for s in active.tolist()], dtype=torch.long, device=src.device)
            ban_tokens(log_probs, history.view(active.numel(), step), cfg)
        best_score, best = log_probs.max(dim=-1)
        step += 1
        finished = (best == EOS_ID) | (limit[active] <= step)
        for row, (sentence, token, score) in enumerate(zip(active.tolist(), best.tolist(), best_score.tolist())):
            scores[sentence] += score
            if return_attention and attn is not None:
                attns[sentence].append(attn[row, : int(src_len[sentence])].cpu())
            if token != EOS_ID:
                tokens[sentence].append(token)
        if finished.any():
            keep = (~finished).nonzero().squeeze(1)
            active, best = active[keep], best[keep]
            enc, state = enc.select(keep), state.select(keep)
        prev = best
    found = [[Hypothesis(tokens[i], scores[i], torch.stack(attns[i]) if attns[i] else None)] for i in range(batch_size)]
    return _to_ids(found, vocab)


# --- beam search -------------------------------------------------------------------------------
def _add_finished(found: list[Hypothesis], hyp: Hypothesis, keep: int) -> None:
    """Insert into a sentence's finished list, kept sorted best first and cut to ``keep``."""
    found.append(hyp)
    found.sort(key=lambda h: (-h.normalized_score, -h.score, h.tokens))
    del found[keep:]


def _make_hypothesis(tokens: list[int], score: float, steps: int, attention: Optional[torch.Tensor],
                     src_len: int, penalty: Callable[[int], float]) -> Hypothesis:
    """tokens without EOS; steps = generated tokens, EOS included; attention [steps, S] or None."""
    attention = None if attention is None else attention[:, :src_len].cpu()
    return Hypothesis(tokens, score, attention, score / penalty(steps))


def _top_candidates(scores: torch.Tensor, log_probs: torch.Tensor, k: int):
    """scores [b, K], log_probs [b*K, V] -> the 2K best extensions per sentence, best first:
    (scores [b, 2K], parent beams [b, 2K], tokens [b, 2K]).

    Each of a sentence's 2K best extensions is among its parent beam's 2K best tokens, so only
    those [b, K, 2K] are scored, instead of all K * V.
    """
    b, vocab = scores.size(0), log_probs.size(-1)
    width = min(2 * k, vocab)
    row_scores, row_tokens = log_probs.topk(width, dim=-1)  # [b*K, 2K]
    total = (scores.unsqueeze(2) + row_scores.view(b, k, width)).view(b, k * width)
    cand_scores, index = total.topk(min(2 * k, k * width), dim=1)  # [b, 2K]
    return cand_scores, torch.div(index, width, rounding_mode="floor"), row_tokens.view(b, k * width).gather(1, index)


@functools.lru_cache(maxsize=None)
def _block_width(vocab: int) -> Optional[int]:
    """A divisor of the vocabulary size near 64 (the fast candidate selection's block), or None."""
    for width in sorted(range(16, 129), key=lambda w: abs(w - 64)):
        if vocab % width == 0 and vocab // width >= 2:
            return width
    return None


def _top_candidates_thresholded(scores: torch.Tensor, log_probs: torch.Tensor, k: int):
    """The result of :func:`_top_candidates` without a top-k over every row's whole vocabulary (slow on CPUs).

    The vocabulary is cut into blocks. The 2K-th best of a sentence's block maxima (plus beam scores) is a
    threshold that at least 2K of its extensions reach, and so does each of its 2K best; only the blocks
    whose maximum reaches it are searched. Ties rank by beam, then token. Returns None where it does not
    apply (a vocabulary without a block width, too few live extensions).
    """
    b, vocab, width = scores.size(0), log_probs.size(-1), 2 * k
    block = _block_width(vocab)
    if block is None:
        return None
    blocks = log_probs.view(b * k, vocab // block, block)  # [b*K, N, block]
    maxima = blocks.amax(-1)  # [b*K, N]
    block_totals = (scores.reshape(-1, 1) + maxima).view(b, -1)  # [b, K*N]
    if block_totals.size(1) < width:
        return None
    threshold = block_totals.topk(width, dim=1).values[:, -1]  # [b]
    if not torch.isfinite(threshold).all():
        return None
    # a margin below, so that rounding in (threshold - score) never drops an extension that reaches it
    row_threshold = (threshold[:, None] - scores).reshape(-1, 1) - 1e-3  # [b*K, 1]; +inf for dead beams
    block_rows, block_ids = (maxima >= row_threshold).nonzero(as_tuple=True)  # [m] each, row-major
    values = blocks[block_rows, block_ids]  # [m, block]
    pair, offset = (values >= row_threshold[block_rows]).nonzero(as_tuple=True)  # [n] each
    rows, tokens = block_rows[pair], block_ids[pair] * block + offset  # in (beam, token) order
    totals = scores.reshape(-1)[rows] + values[pair, offset]  # [n]
    sentence = torch.div(rows, k, rounding_mode="floor")
    order = totals.argsort(descending=True, stable=True)  # best first, ties in (beam, token) order
    order = order[sentence[order].argsort(stable=True)]  # grouped by sentence, each group best first
    counts = torch.bincount(sentence, minlength=b)
    starts = counts.cumsum(0) - counts  # [b] where each sentence's group begins
    pick = order[(starts[:, None] + torch.arange(width, device=scores.device)).view(-1)].view(b, width)
    return totals[pick], rows[pick] - torch.arange(b, device=scores.device)[:, None] * k, tokens[pick]


def _live_positions(cand_tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Positions [b, K] of the K best candidates that do not end in EOS (each parent gives at most one
    EOS candidate, so there are always K), in candidate order."""
    width = cand_tokens.size(1)
    key = (cand_tokens == EOS_ID).long() * width + torch.arange(width, device=cand_tokens.device)
    return key.topk(k, dim=1, largest=False).indices


@torch.no_grad()
def beam_search(model, src: torch.Tensor, src_len: torch.Tensor, cfg: SearchConfig, n_best: int = 1,
                return_attention: bool = False, vocab: Optional[torch.Tensor] = None,
                allowed: Optional[torch.Tensor] = None) -> list[list[Hypothesis]]:
    """Batched beam search of width K = cfg.beam_size with the GNMT length penalty cfg.alpha.

    Returns, per sentence, its min(n_best, found) (at least 1) best hypotheses by normalized score.
    """
    if n_best < 1:
        raise ValueError(f"n_best={n_best} must be at least 1")
    batch, k, device = src.size(0), cfg.beam_size, src.device
    keep = n_best  # finished hypotheses kept per sentence; the stopping rule waits for this many
    penalty = penalty_of(cfg)
    enc = _encode(model, src, src_len, vocab, allowed)
    # The first step runs one row per sentence (its K beams would all be the same: only beam 0 is live), the
    # later steps K; enc stays one row per sentence throughout (see Decoder.step)
    state = model.init_state(enc)
    limits, lengths = max_lengths(src_len, cfg).tolist(), src_len.tolist()
    active = list(range(batch))  # original sentence of each of the b live sentences
    scores = torch.full((batch, k), NEG_INF, device=device)  # [b, K] raw beam scores
    scores[:, 0] = 0.0  # only beam 0 is live at first, so no hypothesis is found twice
    history = torch.zeros(batch, k, 0, dtype=torch.long, device=device)  # [b, K, t] tokens so far
    attn_history: Optional[torch.Tensor] = None  # [b, K, t, S] when attention is returned
    prev = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)  # [b] at the first step, then [b*K]
    found: list[list[Hypothesis]] = [[] for _ in range(batch)]
    best_ended = [False] * batch  # per sentence: its best extension at some step ended in EOS (early stopping)
    t = 0
    while active:
        logits, state, attn = model.step(prev, state, enc)  # logits [b*K, V] ([b, V] at first), attn [b*K, S]
        b, first = len(active), t == 0
        log_probs = allowed_log_probs(logits)  # [b*K, V] ([b, V] at the first step)
        if has_constraints(cfg):
            ban_tokens(log_probs, history[:, 0] if first else history.view(b * k, t), cfg)
        t += 1
        if return_attention and attn is not None:  # still indexed by parent beam: [b, K, t, S]
            step_attn = attn.float().repeat_interleave(k, 0) if first else attn.float()
            step_attn = step_attn.view(b, k, 1, -1)
            attn_history = step_attn if attn_history is None else torch.cat([attn_history, step_attn], 2)
        # the C kernel (float32 on the CPU); at the first step the 2K best tokens of each sentence's one row
        if first:
            candidates = search_kernel.top_candidates(scores[:, :1], log_probs, 1, width=2 * k)
            if candidates is None:  # the paths below take K rows; beams 1..K-1 are dead (score -inf)
                log_probs = log_probs.repeat_interleave(k, 0)  # [b*K, V]
        else:
            candidates = search_kernel.top_candidates(scores, log_probs, k)
        if candidates is None:
            candidates = _top_candidates_thresholded(scores, log_probs, k)
        if candidates is None:
            candidates = _top_candidates(scores, log_probs, k)
        cand_scores, cand_beams, cand_tokens = candidates  # each [b, 2K]

        # finish the EOS candidates among the top K
        eos = (cand_tokens[:, :k] == EOS_ID) & (cand_scores[:, :k] > NEG_INF)  # [b, K]
        rows, cols = eos.nonzero(as_tuple=True)
        if rows.numel():
            parents = cand_beams[rows, cols]
            eos_tokens = history[rows, parents].tolist()  # [n, t - 1]
            eos_attn = attn_history[rows, parents] if attn_history is not None else None  # [n, t, S]
            for i, (row, score) in enumerate(zip(rows.tolist(), cand_scores[rows, cols].tolist())):
                sentence = active[row]
                hyp = _make_hypothesis(eos_tokens[i], score, t, None if eos_attn is None else eos_attn[i],
                                       lengths[sentence], penalty)
                _add_finished(found[sentence], hyp, keep)

        # the K best non-EOS candidates continue
        live = _live_positions(cand_tokens, k)  # [b, K]
        scores, parents = cand_scores.gather(1, live), cand_beams.gather(1, live)  # [b, K]
        tokens = cand_tokens.gather(1, live)  # [b, K]
        rows_flat = (torch.arange(b, device=device)[:, None] * k + parents).view(-1)  # [b*K] parent beams' rows
        history = torch.cat([history.view(b * k, t - 1)[rows_flat].view(b, k, t - 1), tokens.unsqueeze(2)], 2)
        if attn_history is not None:
            attn_history = attn_history.view(b * k, t, -1)[rows_flat].view(b, k, t, -1)
        if first:  # the state's rows: each sentence's one row, K times
            rows_flat = torch.arange(b, device=device).repeat_interleave(k)

        if cfg.stopping == "early":
            for row in (cand_tokens[:, 0] == EOS_ID).nonzero().view(-1).tolist():
                best_ended[active[row]] = True
            settled = [best_ended[sentence] and len(found[sentence]) >= n_best for sentence in active]
        else:
            settled = None
        done = _finish_sentences(active, found, scores, history, attn_history, limits, lengths, t, penalty, keep,
                                 settled)
        if all(done):
            break
        kept = torch.tensor([row for row in range(b) if not done[row]], dtype=torch.long, device=device)
        if kept.numel() < b:  # finished sentences leave the batch
            enc, rows_flat = enc.select(kept), rows_flat.view(b, k)[kept].view(-1)
            scores, tokens, history = scores[kept], tokens[kept], history[kept]
            attn_history = attn_history[kept] if attn_history is not None else None
            active = [active[row] for row in kept.tolist()]
        state = state.select(rows_flat)
        prev = tokens.reshape(-1)
    return _to_ids([hyps[:n_best] for hyps in found], vocab)


def _finish_sentences(active: list[int], found: list[list[Hypothesis]], scores: torch.Tensor,
                      history: torch.Tensor, attn_history: Optional[torch.Tensor], limits: list[int],
                      lengths: list[int], t: int, penalty: Callable[[int], float], keep: int,
                      settled: Optional[list[bool]] = None) -> list[bool]:
    """Decide which sentences stop after step t; those at their maximum length finish their live beams
    as they are. scores [b, K] (best first), history [b, K, t], attn_history [b, K, t, S] or None.
    settled: per row, whether early stopping stops it (the bound rule always may); None for the bound rule."""
    all_scores = scores.tolist()
    done = []
    for row, sentence in enumerate(active):
        hyps, at_limit = found[sentence], t >= limits[sentence]
        # the best normalized score any live hypothesis could still reach (scores are <= 0)
        bound = all_scores[row][0] / penalty(limits[sentence])
        worst = hyps[keep - 1].normalized_score if len(hyps) >= keep else NEG_INF
        stop = at_limit or bound <= worst or (settled is not None and settled[row])
        if stop and (at_limit or not hyps):  # at the limit, or every beam dead (all tokens banned)
            row_tokens = history[row].tolist()  # [K][t]
            for beam, score in enumerate(all_scores[row]):
                if (score > NEG_INF and at_limit) or (beam == 0 and not hyps):  # always at least one
                    attention = attn_history[row, beam] if attn_history is not None else None
                    hyp = _make_hypothesis(row_tokens[beam], score, t, attention, lengths[sentence], penalty)
                    _add_finished(hyps, hyp, keep)
        done.append(stop)
    return done


@torch.no_grad()
def search(model, src: torch.Tensor, src_len: torch.Tensor, cfg: SearchConfig, n_best: int = 1,
           return_attention: bool = False, vocab: Optional[torch.Tensor] = None,
           allowed: Optional[torch.Tensor] = None) -> list[list[Hypothesis]]:
    """Decode a batch: greedy for beam size 1, else beam search. Returns n-best lists, best first.
    ``vocab``: a shortlist of target ids [V'] to decode over, ``allowed`` [B, V'] each sentence's part of
    it (see the module's docstring)."""
    if cfg.beam_size == 1:
        return greedy_search(model, src, src_len, cfg, return_attention, vocab, allowed)
    return beam_search(model, src, src_len, cfg, n_best=n_best, return_attention=return_attention, vocab=vocab,
                       allowed=allowed)
