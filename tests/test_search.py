"""Greedy and beam search: hand-worked scripted decoders, exhaustive enumeration, greedy == beam 1,
batch invariance, token constraints and attention bookkeeping."""
import itertools
import math
from dataclasses import dataclass

import pytest
import torch

from seq2seq.batch import make_batch
from seq2seq.config import ConfigError, SearchConfig
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.search import (_top_candidates, _top_candidates_thresholded, beam_search, greedy_search,
                            length_penalty, max_lengths, search)
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from tests.conftest import tiny_model_config

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
        for row, (prefix, first) in enumerate(zip(prefixes, enc.src_first)):
            for token, p in self.tables[first].get(prefix, {EOS_ID: 1.0}).items():
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
    assert model.rows_per_step == [4, 2, 2]


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


# --- real, randomly initialised models ---------------------------------------------------------------
VOCAB = 20


def make_model(cell="gru", attention="bahdanau", vocab=VOCAB, seed=0, eos_bias=0.0, unk_bias=0.0):
    torch.manual_seed(seed)
    model = Seq2Seq(tiny_model_config(cell=cell, attention=attention, input_feeding=attention.startswith("luong")),
                    vocab, vocab).eval()
    with torch.no_grad():
        model.decoder.output.bias[EOS_ID] += eos_bias
        model.decoder.output.bias[UNK_ID] += unk_bias
    return model


def random_sources(n, vocab=VOCAB, max_len=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return make_batch([torch.randint(4, vocab, (m,), generator=g).tolist() for m in lengths])


def steps_of(hyp, limit):
    """Generated tokens, EOS included: an output at the length limit has no EOS."""
    return len(hyp.tokens) if len(hyp.tokens) == limit else len(hyp.tokens) + 1


@pytest.mark.parametrize("cell,attention,vocab", [(c, a, VOCAB) for c, a in itertools.product(
    ("gru", "lstm"), ("bahdanau", "luong_general", "none"))] + [("gru", "bahdanau", 256)])
def test_beam_size_one_is_greedy(cell, attention, vocab):
    """vocab 256: beam search ranks candidates through vocabulary blocks (the fast path)."""
    batch = random_sources(12, vocab=vocab)
    cfg = SearchConfig(beam_size=1, max_len_a=1.0, max_len_b=3)
    limits = max_lengths(batch.src_len, cfg).tolist()
    ended_with_eos = set()
    # mostly outputs cut at the length limit, then mostly ended by EOS
    for eos_bias in (-2.0, 0.3 if vocab == VOCAB else 3.0):
        model = make_model(cell, attention, vocab=vocab, eos_bias=eos_bias)
        greedy = greedy_search(model, batch.src, batch.src_len, cfg, return_attention=True)
        beam = beam_search(model, batch.src, batch.src_len, cfg, return_attention=True)
        ended_with_eos |= {len(g[0].tokens) < limit for g, limit in zip(greedy, limits)}
        for (g,), (b,) in zip(greedy, beam):
            assert b.tokens == g.tokens
            assert b.score == pytest.approx(g.score, abs=1e-5)
            assert b.normalized_score == b.score
            if attention == "none":
                assert g.attention is None and b.attention is None
            else:
                assert torch.allclose(b.attention, g.attention, atol=1e-6)
    assert ended_with_eos == {True, False}  # both ways of ending were compared


@pytest.mark.parametrize("beam,alpha,stopping,vocab", [(1, 0.0, "bound", VOCAB), (3, 0.0, "bound", VOCAB),
                                                       (5, 0.0, "bound", VOCAB), (3, 1.0, "bound", VOCAB),
                                                       (5, 0.6, "bound", VOCAB), (5, 1.0, "early", VOCAB),
                                                       (5, 1.0, "early", 256), (3, 0.6, "bound", 256)])
def test_results_do_not_depend_on_the_batch(beam, alpha, stopping, vocab):
    model = make_model("gru", "bahdanau", vocab=vocab, eos_bias=1.0)
    batch = random_sources(64, vocab=vocab, max_len=15)
    cfg = SearchConfig(beam_size=beam, alpha=alpha, max_len_a=1.0, max_len_b=3, stopping=stopping)
    together = beam_search(model, batch.src, batch.src_len, cfg, n_best=beam)
    for i, hyps in enumerate(together):
        n = int(batch.src_len[i])
        alone = beam_search(model, batch.src[i:i + 1, :n], batch.src_len[i:i + 1], cfg, n_best=beam)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        scores, alone_scores = torch.tensor([h.score for h in hyps]), torch.tensor([h.score for h in alone])
        assert torch.allclose(scores, alone_scores, atol=1e-5)
        assert len(hyps) == beam


@torch.no_grad()
def exhaustive(model, src, src_len, max_len, alpha):
    """Every output of at most max_len tokens (EOS included, or max_len tokens without EOS), scored by
    running model.step over every prefix: [(normalized, score, tokens)]."""
    enc = model.encode(src, src_len)
    vocab = model.decoder.output.out_features
    others = torch.tensor([v for v in range(vocab) if v not in (EOS_ID, PAD_ID, BOS_ID)])  # never generated
    state, prev, prefixes, prefix_scores = model.init_state(enc), torch.tensor([BOS_ID]), [()], torch.zeros(1)
    outputs = []
    for t in range(1, max_len + 1):
        logits, state, _ = model.step(prev, state, enc.select(torch.zeros(len(prefixes), dtype=torch.long)))
        total = prefix_scores[:, None] + torch.log_softmax(logits.float(), -1)  # [n, V]
        ends = [(p, float(total[i, EOS_ID])) for i, p in enumerate(prefixes)]
        if t == max_len:
            ends += [(p + (v,), float(total[i, v])) for i, p in enumerate(prefixes) for v in others.tolist()]
        outputs += [(score / length_penalty(t, alpha), score, list(p)) for p, score in ends]
        parent = torch.arange(len(prefixes)).repeat_interleave(len(others))
        prev = others.repeat(len(prefixes))
        prefix_scores, state = total[parent, prev], state.select(parent)
        prefixes = [p + (v,) for p in prefixes for v in others.tolist()]
    return sorted(outputs, key=lambda o: (-o[0], -o[1], o[2]))


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_large_beam_equals_exhaustive_search(alpha):
    vocab, max_len = 9, 4  # 5 real tokens; 8 tokens other than EOS
    model = make_model("gru", "bahdanau", vocab=vocab, seed=3, eos_bias=1.0)
    # K = 8 * 8 * 9 keeps every prefix and finishes every EOS candidate before the last step; at the
    # last step the best outputs are the best candidates. So the beam is exhaustive.
    cfg = SearchConfig(beam_size=8 * 8 * 9, alpha=alpha, max_len_a=0, max_len_b=max_len, stopping="bound")
    batch = random_sources(3, vocab=vocab, max_len=5, seed=4)
    found = beam_search(model, batch.src, batch.src_len, cfg, n_best=10)
    for i in range(3):
        n = int(batch.src_len[i])
        best = exhaustive(model, batch.src[i:i + 1, :n], batch.src_len[i:i + 1], max_len, alpha)[:10]
        assert [h.tokens for h in found[i]] == [tokens for _, _, tokens in best]
        assert [h.score for h in found[i]] == pytest.approx([s for _, s, _ in best], abs=1e-5)
        assert [h.normalized_score for h in found[i]] == pytest.approx([s for s, _, _ in best], abs=1e-5)


@pytest.mark.parametrize("attention", ["bahdanau", "luong_general"])
def test_scores_and_attention_are_those_of_the_returned_tokens(attention):
    """Teacher-forcing each returned hypothesis reproduces its score and its attention rows."""
    model = make_model("lstm", attention)
    batch = random_sources(10)
    cfg = SearchConfig(beam_size=4, alpha=0.5, max_len_a=1.0, max_len_b=3)
    results = search(model, batch.src, batch.src_len, cfg, n_best=4, return_attention=True)
    limits = max_lengths(batch.src_len, cfg).tolist()
    seen_eos, longest = False, 0
    for i, hyps in enumerate(results):
        n = int(batch.src_len[i])
        enc = model.encode(batch.src[i:i + 1, :n], batch.src_len[i:i + 1])
        for h in hyps:
            steps = steps_of(h, limits[i])
            seen_eos, longest = seen_eos or steps == len(h.tokens) + 1, max(longest, steps)
            assert h.attention.shape == (steps, n)
            assert torch.allclose(h.attention.sum(-1), torch.ones(steps), atol=1e-5)
            tgt_in = torch.tensor([[BOS_ID] + h.tokens[: steps - 1]])
            tgt_out = (h.tokens + [EOS_ID])[:steps]
            with torch.no_grad():
                logits, attn = model.decoder(tgt_in, enc, return_attention=True)
            log_probs = torch.log_softmax(logits[0].float(), -1)
            assert h.score == pytest.approx(float(log_probs[torch.arange(steps), tgt_out].sum()), abs=1e-4)
            assert h.normalized_score == pytest.approx(h.score / length_penalty(steps, 0.5), abs=1e-6)
            assert torch.allclose(h.attention, attn[0], atol=1e-5)
    assert seen_eos and longest >= 4  # both endings; beams reordered over several steps


def test_no_attention_model_returns_none():
    model = make_model("gru", "none")
    batch = random_sources(4)
    for hyps in beam_search(model, batch.src, batch.src_len, SearchConfig(beam_size=3), n_best=3,
                            return_attention=True):
        assert all(h.attention is None for h in hyps)


def decode_all(model, batch, **cfg):
    """Greedy outputs and beam-3 3-best outputs, all token lists."""
    config = SearchConfig(max_len_a=1.0, max_len_b=3, **cfg)
    greedy = [h[0].tokens for h in greedy_search(model, batch.src, batch.src_len, config)]
    config.beam_size = 3
    beam = [h.tokens for hyps in beam_search(model, batch.src, batch.src_len, config, n_best=3) for h in hyps]
    return greedy + beam


def repeats_ngram(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_constraints_on_a_real_model():
    batch = random_sources(16)
    unk_model = make_model("gru", "bahdanau", unk_bias=2.0)
    assert any(UNK_ID in tokens for tokens in decode_all(unk_model, batch))
    assert not any(UNK_ID in tokens for tokens in decode_all(unk_model, batch, forbid_unk=True))

    model = make_model("gru", "bahdanau")  # long outputs, full of repeats
    assert any(repeats_ngram(tokens, 2) for tokens in decode_all(model, batch))
    assert not any(repeats_ngram(tokens, 2) for tokens in decode_all(model, batch, no_repeat_ngram=2))
    model = make_model("gru", "bahdanau", eos_bias=2.0)  # short outputs
    assert min(len(tokens) for tokens in decode_all(model, batch)) < 3
    assert min(len(tokens) for tokens in decode_all(model, batch, min_len=3)) >= 3


def test_average_length_penalty_ranks_by_mean_log_probability():
    model = make_model("gru", "bahdanau", eos_bias=1.0)
    batch = random_sources(8)
    cfg = SearchConfig(beam_size=4, length_penalty="average", max_len_a=1.0, max_len_b=3)
    limits = max_lengths(batch.src_len, cfg).tolist()
    for i, hyps in enumerate(beam_search(model, batch.src, batch.src_len, cfg, n_best=4)):
        for h in hyps:
            assert h.normalized_score == pytest.approx(h.score / steps_of(h, limits[i]), abs=1e-6)
        assert [h.normalized_score for h in hyps] == sorted((h.normalized_score for h in hyps), reverse=True)
    with pytest.raises(ConfigError, match="search.length_penalty='median' is not one of gnmt, average"):
        SearchConfig(length_penalty="median").validate()


@pytest.mark.parametrize("k,vocab", [(5, 8000), (1, 640), (3, 10000)])
def test_block_candidates_equal_a_full_top_k(k, vocab):
    """The fast candidate ranking (vocabulary blocks under a threshold) against topk over every token,
    with dead beams and banned tokens; random scores have no ties."""
    g = torch.Generator().manual_seed(k)
    b = 9
    log_probs = torch.log_softmax(torch.randn(b * k, vocab, generator=g) * 3, -1)
    log_probs[:, :3] = float("-inf")
    log_probs[5, EOS_ID] = float("-inf")
    scores = -torch.rand(b, k, generator=g) * 10
    scores[2, 1:] = float("-inf")  # one live beam, as at the first step
    fast = _top_candidates_thresholded(scores, log_probs, k)
    assert fast is not None
    for got, want in zip(fast, _top_candidates(scores, log_probs, k)):
        assert torch.equal(got, want)


def test_block_candidates_step_aside_where_they_do_not_apply():
    scores = torch.zeros(2, 5)
    assert _top_candidates_thresholded(scores, torch.zeros(10, 20), 5) is None  # no block width for 20
    scores[1, 1:] = float("-inf")  # 1 live beam x 2 blocks of 64 < 2K = 10 extensions to rank
    assert _top_candidates_thresholded(scores, torch.randn(10, 128).log_softmax(-1), 5) is None
