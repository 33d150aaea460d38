"""Greedy and beam search on real, randomly initialised models: greedy == beam 1, batch invariance,
exhaustive enumeration, attention bookkeeping, constraints, and the fast candidate ranking."""
import itertools

import pytest
import torch

from seq2seq import search_kernel
from seq2seq.batch import make_batch
from seq2seq.config import ConfigError, SearchConfig
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.search import (
    _top_candidates,
    _top_candidates_thresholded,
    beam_search,
    greedy_search,
    length_penalty,
    max_lengths,
    search,
)
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from tests.conftest import tiny_model_config

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
    ("gru", "lstm"), ("bahdanau", "luong_general", "none"))] + [("gru", "bahdanau", 256),
                                                                  ("gru", "luong_concat", VOCAB)])
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


@pytest.mark.parametrize("beam,alpha,stopping,vocab,cell,attention", [
    (1, 0.0, "bound", VOCAB, "gru", "bahdanau"), (3, 0.0, "bound", VOCAB, "gru", "bahdanau"),
    (5, 0.0, "bound", VOCAB, "gru", "bahdanau"), (3, 1.0, "bound", VOCAB, "gru", "bahdanau"),
    (5, 0.6, "bound", VOCAB, "gru", "bahdanau"), (5, 1.0, "early", VOCAB, "gru", "bahdanau"),
    (5, 1.0, "early", 256, "gru", "bahdanau"), (3, 0.6, "bound", 256, "gru", "bahdanau"),
    (5, 1.0, "early", VOCAB, "lstm", "luong_general"), (3, 0.6, "bound", 256, "lstm", "luong_general"),
    (5, 1.0, "early", VOCAB, "gru", "none"), (3, 0.6, "bound", 256, "gru", "none")])
def test_results_do_not_depend_on_the_batch(beam, alpha, stopping, vocab, cell, attention):
    """Beam search shares each sentence's encoder output among its hypotheses (Decoder.step): a sentence
    decoded among others gets what it gets alone."""
    model = make_model(cell, attention, vocab=vocab, eos_bias=1.0)
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


def ranking_with_ties(k: int, vocab: int, b: int = 7, seed: int = 0):
    """Log-probabilities on a coarse grid (many equal totals), banned tokens, dead beams and one live beam."""
    g = torch.Generator().manual_seed(seed)
    log_probs = -torch.randint(0, 6, (b * k, vocab), generator=g).float() / 4
    log_probs[:, PAD_ID] = log_probs[:, BOS_ID] = float("-inf")
    log_probs[3, 5:40] = float("-inf")
    scores = -torch.randint(0, 4, (b, k), generator=g).float() / 2
    scores[2, 1:] = float("-inf")  # one live beam, as at the first step
    scores[4, k - 1] = float("-inf") if k > 1 else scores[4, 0]
    return scores, log_probs


@pytest.mark.skipif(search_kernel.LIBRARY.get() is None, reason="the C kernel could not be built here")
@pytest.mark.parametrize("k,vocab", [(5, 8000), (5, 1216), (1, 640), (3, 1000), (4, 50)])
def test_candidate_kernel_equals_the_block_ranking_bit_for_bit(k, vocab):
    """The C kernel against the ATen ranking (ties in (beam, token) order) where that applies, else against a full
    top-k over every token (random scores: no ties), at vocabularies with and without a partial last block."""
    scores, log_probs = ranking_with_ties(k, vocab)
    got = search_kernel.top_candidates(scores, log_probs, k)
    want = _top_candidates_thresholded(scores, log_probs, k)
    if want is not None:
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    g = torch.Generator().manual_seed(k)
    log_probs = torch.log_softmax(torch.randn(9 * k, vocab, generator=g) * 3, -1)
    log_probs[:, :3] = float("-inf")
    scores = -torch.rand(9, k, generator=g) * 10
    scores[2, 1:] = float("-inf")
    log_probs[2 * k, 4:] = float("-inf")  # that beam: its EOS and the last 2K - 1 tokens only, in two blocks
    log_probs[2 * k, -(2 * k - 1):] = torch.randn(2 * k - 1, generator=g)
    got = search_kernel.top_candidates(scores, log_probs, k)
    assert got is not None
    for a, b in zip(got, _top_candidates(scores, log_probs, k)):
        assert torch.equal(a, b)


@pytest.mark.skipif(search_kernel.LIBRARY.get() is None, reason="the C kernel could not be built here")
def test_candidate_kernel_steps_aside_where_it_does_not_apply():
    scores, log_probs = ranking_with_ties(5, 300)
    scores[1, 1:] = float("-inf")
    log_probs[5, 4:] = float("-inf")  # one live beam with 2 finite tokens: fewer than 2K extensions
    assert search_kernel.top_candidates(scores, log_probs, 5) is None
    assert search_kernel.top_candidates(scores.double(), log_probs.double(), 5) is None  # float32 only


@pytest.mark.parametrize("stopping", ["bound", "early"])
def test_beam_search_with_and_without_the_candidate_kernel_finds_the_same(stopping, monkeypatch):
    model = make_model(attention="luong_concat", vocab=200, seed=3)
    batch = random_sources(6, vocab=200, seed=4)
    cfg = SearchConfig(beam_size=4, max_len_a=1.5, max_len_b=4, stopping=stopping)
    calls = []
    kernel = search_kernel.top_candidates
    monkeypatch.setattr(search_kernel, "top_candidates", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    with_kernel = beam_search(model, batch.src, batch.src_len, cfg, n_best=3)
    assert calls
    monkeypatch.setattr(search_kernel, "top_candidates", lambda *a, **kw: None)
    without = beam_search(model, batch.src, batch.src_len, cfg, n_best=3)
    assert [[(h.tokens, h.score) for h in hyps] for hyps in with_kernel] == \
        [[(h.tokens, h.score) for h in hyps] for hyps in without]
