"""Greedy and beam search on hand-worked scripted decoders: length penalty, n-best lists, stopping rules,
finished sentences leaving the batch, token constraints."""
import math
from dataclasses import dataclass

import pytest
import torch

from seq2seq.config import ConfigError, SearchConfig
from seq2seq.search import beam_search, greedy_search, length_penalty
from seq2seq.tokenizer import BOS_ID, EOS_ID, UNK_ID

A, B = 4, 5  # the scripted vocabulary: PAD UNK BOS EOS A B
log = math.log


# --- a scripted decoder: next-token probabilities are a table keyed by the prefix generated so far ----
@dataclass
class FakeEnc:
    src_first: list[int]  # first source token of each row: picks the row's table

    def select(self, index: torch.Tensor) -> "FakeEnc":
        return FakeEnc([self.src_first[i] for i in index.tolist()])


@dataclass
class FakeState:
    prefixes: list[tuple]  # tokens generated so far (BOS excluded), per row

    def select(self, index: torch.Tensor) -> "FakeState":
        return FakeState([self.prefixes[i] for i in index.tolist()])


class ScriptedModel:
    """tables: first source token -> {prefix: {token: probability}}; an unlisted prefix ends (EOS = 1)."""

    def __init__(self, tables: dict, vocab: int = 6):
        self.tables, self.vocab, self.rows_per_step = tables, vocab, []

    def encode(self, src, src_len):
        return FakeEnc(src[:, 0].tolist())

    def init_state(self, enc):
        return FakeState([() for _ in enc.src_first])

    def step(self, prev, state, enc):
        self.rows_per_step.append(prev.numel())
        prefixes = [p if tok == BOS_ID else p + (tok,) for p, tok in zip(state.prefixes, prev.tolist())]
        probs = torch.zeros(len(prefixes), self.vocab)
        group = len(prefixes) // len(enc.src_first)  # rows per encoder row: K in beam search (the step contract)
        assert group * len(enc.src_first) == len(prefixes)
        for row, prefix in enumerate(prefixes):
            for token, p in self.tables[enc.src_first[row // group]].get(prefix, {EOS_ID: 1.0}).items():
                probs[row, token] = p
        return probs.log(), FakeState(prefixes), None


# greedy takes A (0.5) then EOS: 0.2; beam 2 finds B EOS: 0.36
GREEDY_WRONG = {(): {A: .5, B: .4, EOS_ID: .1}, (A,): {EOS_ID: .4, A: .3, B: .3},
                (B,): {EOS_ID: .9, A: .05, B: .05}}
# [] finishes first (0.4); [A, A] (0.55 * 0.9 * 0.9 = 0.4455) finishes two steps later and wins
LATE_WINNER = {(): {A: .55, B: .05, EOS_ID: .4}, (A,): {A: .9, EOS_ID: .1}, (A, A): {EOS_ID: .9, A: .1}}
# [] = 0.45 beats [A, A] = 0.4 on raw score; with alpha = 1 [A, A] wins: log(.4) / (8/6) > log(.45) / 1
PENALTY = {(): {A: .5, EOS_ID: .45, B: .05}, (A,): {A: .8, EOS_ID: .2}, (A, A): {EOS_ID: 1.0}}
# EOS is the most probable first token; min_len pushes it later
EARLY_EOS = {(): {EOS_ID: .6, A: .3, B: .1}, (A,): {EOS_ID: .7, B: .3}, (A, B): {EOS_ID: 1.0}}
# the best continuation of [A] repeats A
REPEAT = {(): {A: .6, EOS_ID: .4}, (A,): {A: .6, B: .1, EOS_ID: .3}, (A, A): {EOS_ID: 1.0}}


def run_scripted(table, beam: int, n_best: int = 1, **cfg):
    """beam = 0: greedy_search; else beam_search of that width (exact stopping unless cfg says otherwise)."""
    cfg.setdefault("stopping", "bound")
    model = ScriptedModel({7: table})
    src, src_len = torch.tensor([[7, 8]]), torch.tensor([2])
    config = SearchConfig(beam_size=max(beam, 1), max_len_a=0, max_len_b=10, **cfg)
    if beam == 0:
        return greedy_search(model, src, src_len, config)[0]
    return beam_search(model, src, src_len, config, n_best=n_best)[0]


def assert_hyps(hyps, expected):
    """expected: [(tokens, probability of the whole output)]"""
    assert [h.tokens for h in hyps] == [tokens for tokens, _ in expected]
    for h, (_, p) in zip(hyps, expected):
        assert h.score == pytest.approx(log(p), abs=1e-6)


def test_length_penalty_is_gnmt():
    assert length_penalty(7, 0.0) == 1.0
    assert length_penalty(1, 1.0) == 1.0
    assert length_penalty(7, 0.5) == pytest.approx(math.sqrt(2.0))


def test_beam_finds_the_sequence_greedy_misses():
    assert_hyps(run_scripted(GREEDY_WRONG, beam=0), [([A], .5 * .4)])
    assert_hyps(run_scripted(GREEDY_WRONG, beam=1), [([A], .5 * .4)])
    assert_hyps(run_scripted(GREEDY_WRONG, beam=2), [([B], .4 * .9)])


def test_search_continues_past_an_early_worse_hypothesis():
    hyps = run_scripted(LATE_WINNER, beam=2, n_best=2)
    assert_hyps(hyps, [([A, A], .55 * .9 * .9), ([], .4)])


def test_length_penalty_changes_the_winner():
    raw = run_scripted(PENALTY, beam=2, n_best=2)
    assert_hyps(raw, [([], .45), ([A, A], .4)])
    assert [h.normalized_score for h in raw] == [h.score for h in raw]
    penalised = run_scripted(PENALTY, beam=2, n_best=2, alpha=1.0)
    assert_hyps(penalised, [([A, A], .4), ([], .45)])
    assert penalised[0].normalized_score == pytest.approx(log(.4) / (8 / 6), abs=1e-6)
    assert penalised[1].normalized_score == pytest.approx(log(.45), abs=1e-6)


def test_length_penalty_bound_keeps_searching():
    """K = 1: [] (0.5) finishes first and every live score is below it, but [A, A] (0.45 * 0.95) wins
    once penalised, so the search must not stop on raw scores or on the current length's penalty."""
    table = {(): {EOS_ID: .5, A: .45, B: .05}, (A,): {A: .95, EOS_ID: .05}, (A, A): {EOS_ID: 1.0}}
    assert_hyps(run_scripted(table, beam=1), [([], .5)])
    hyps = run_scripted(table, beam=1, alpha=1.0)
    assert_hyps(hyps, [([A, A], .45 * .95)])
    assert hyps[0].normalized_score == pytest.approx(log(.45 * .95) / (8 / 6), abs=1e-6)


def test_early_stopping_stops_when_the_best_extension_ends():
    """The table of the test above: with early stopping, K = 1 stops at step 1, where EOS is best."""
    table = {(): {EOS_ID: .5, A: .45, B: .05}, (A,): {A: .95, EOS_ID: .05}, (A, A): {EOS_ID: 1.0}}
    model = ScriptedModel({7: table})
    src, src_len = torch.tensor([[7, 8]]), torch.tensor([2])
    for stopping, expected, rows in (("early", [], [1]), ("bound", [A, A], [1, 1, 1])):
        model.rows_per_step.clear()
        cfg = SearchConfig(beam_size=1, alpha=1.0, max_len_a=0, max_len_b=10, stopping=stopping)
        assert beam_search(model, src, src_len, cfg)[0][0].tokens == expected
        assert model.rows_per_step == rows


def test_early_stopping_waits_for_n_best():
    # step 1 finishes [] (0.1); at step 2 the best extension ends ([B], 0.36) and [A] (0.2) ends too: 3 found
    assert_hyps(run_scripted(GREEDY_WRONG, beam=3, n_best=3, stopping="early"), [([B], .36), ([A], .2), ([], .1)])
    # n_best = 4 needs a fourth: [A, A] or [A, B] (tied at 0.15) finish at step 3
    hyps = run_scripted(GREEDY_WRONG, beam=3, n_best=4, stopping="early")
    assert [h.tokens for h in hyps[:3]] == [[B], [A], [A, A]] and len(hyps) == 4


def test_n_best_larger_than_the_beam():
    assert_hyps(run_scripted(GREEDY_WRONG, beam=2, n_best=3), [([B], .36), ([A], .2), ([A, A], .15)])


def test_n_best_order_scores_and_tie_break():
    assert_hyps(run_scripted(GREEDY_WRONG, beam=2, n_best=2), [([B], .36), ([A], .2)])
    # [A, A] and [A, B] tie at 0.15 exactly; the tie is broken by the token sequence
    assert_hyps(run_scripted(GREEDY_WRONG, beam=3, n_best=3), [([B], .36), ([A], .2), ([A, A], .15)])
    assert_hyps(run_scripted(GREEDY_WRONG, beam=3, n_best=1), [([B], .36)])


def test_finished_sentences_leave_the_batch():
    model = ScriptedModel({7: {(): {EOS_ID: 1.0}}, 9: LATE_WINNER})
    hyps = beam_search(model, torch.tensor([[7], [9]]), torch.tensor([1, 1]),
                       SearchConfig(beam_size=2, max_len_a=0, max_len_b=10), n_best=2)
    assert_hyps(hyps[0], [([], 1.0)])
    assert_hyps(hyps[1], [([A, A], .4455), ([], .4)])
    assert model.rows_per_step == [2, 2, 2]  # the first step one row per sentence, then K for the one left


def test_max_length_finishes_hypotheses_without_eos():
    table = {(): {A: .9, EOS_ID: .1}, (A,): {A: .9, EOS_ID: .1}, (A, A): {A: .9, EOS_ID: .1}}
    model = ScriptedModel({7: table})
    cfg = SearchConfig(beam_size=2, max_len_a=0, max_len_b=2)
    hyps = beam_search(model, torch.tensor([[7]]), torch.tensor([1]), cfg, n_best=2)[0]
    assert_hyps(hyps, [([A, A], .81), ([], .1)])  # [A, A] stops at 2 tokens: no EOS probability
    assert_hyps(greedy_search(model, torch.tensor([[7]]), torch.tensor([1]), cfg)[0], [([A, A], .81)])


def test_min_len_forbids_early_eos():
    assert_hyps(run_scripted(EARLY_EOS, beam=0), [([], .6)])
    assert_hyps(run_scripted(EARLY_EOS, beam=0, min_len=1), [([A], .21)])
    assert_hyps(run_scripted(EARLY_EOS, beam=0, min_len=2), [([A, B], .09)])
    assert_hyps(run_scripted(EARLY_EOS, beam=2, n_best=2), [([], .6), ([A], .21)])
    assert_hyps(run_scripted(EARLY_EOS, beam=2, n_best=2, min_len=1), [([A], .21), ([B], .1)])
    assert_hyps(run_scripted(EARLY_EOS, beam=2, n_best=2, min_len=2), [([A, B], .09)])


def test_no_repeat_ngram_blocks_repeats():
    assert_hyps(run_scripted(REPEAT, beam=0), [([A, A], .36)])
    assert_hyps(run_scripted(REPEAT, beam=0, no_repeat_ngram=1), [([A], .18)])
    assert_hyps(run_scripted(REPEAT, beam=2, n_best=2), [([], .4), ([A, A], .36)])
    assert_hyps(run_scripted(REPEAT, beam=2, n_best=2, no_repeat_ngram=1), [([], .4), ([A], .18)])


def test_forbid_unk_on_the_scripted_model():
    table = {(): {UNK_ID: .7, A: .2, EOS_ID: .1}}
    assert_hyps(run_scripted(table, beam=0), [([UNK_ID], .7)])
    assert_hyps(run_scripted(table, beam=0, forbid_unk=True), [([A], .2)])
    assert_hyps(run_scripted(table, beam=3, n_best=3, forbid_unk=True), [([A], .2), ([], .1)])


def test_a_hypothesis_even_when_every_token_is_banned():
    # PENALTY only allows EOS after [A, A]; min_len = 3 bans it, so every output has probability 0:
    # the search still ends (at the step after) with one hypothesis, scored -inf
    for beam in (0, 2):
        hyps = run_scripted(PENALTY, beam=beam, n_best=2, min_len=3)
        assert len(hyps) == 1 and hyps[0].score == float("-inf") and len(hyps[0].tokens) >= 3


def test_new_options_are_validated():
    for name in ("min_len", "no_repeat_ngram"):
        with pytest.raises(ConfigError, match=f"search.{name}"):
            SearchConfig(**{name: -1}).validate()
