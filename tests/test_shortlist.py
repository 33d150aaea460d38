"""Lexical shortlists: IBM Model 1 finds word translations, a batch's vocabulary has what decoding needs,
and decoding over a shortlist is decoding over the full output layer restricted to it."""
import random

import pytest
import torch

from seq2seq.batch import make_batch
from seq2seq.checkpoint import ModelDirError
from seq2seq.config import SearchConfig
from seq2seq.runtime import quantize_int8
from seq2seq.search import search
from seq2seq.shortlist import SUBSET_MULTIPLE, Shortlist, lexical_table
from seq2seq.tokenizer import EOS_ID, PAD_ID, UNK_ID
from tests.test_search import make_model, random_sources

# a toy language pair: source words 4-7 translate to target words 20-23; every sentence also has the word
# 8 -> 24 ("the"), which co-occurs with everything as often as the content words do
WORDS = {4: 20, 5: 21, 6: 22, 7: 23}


def toy_corpus(n=300, seed=0):
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        words = rng.sample(sorted(WORDS), rng.randint(1, 3))
        target = [WORDS[w] for w in words] + [24]
        rng.shuffle(target)
        src.append([8, *words])
        tgt.append(target)
    return src, tgt


def test_ibm_model_1_finds_the_translations_that_co_occurrence_cannot_tell_apart():
    src, tgt = toy_corpus()
    shortlist = Shortlist.build(src, tgt, src_vocab=10, tgt_vocab=30, candidates=1, frequent=0)
    assert {w: int(shortlist.candidates[w, 0]) for w in WORDS} == WORDS
    # (co-occurrence counts cannot: each word meets its translation, 24 and EOS in every sentence it is in)
    # the probabilities of each source word sum to 1
    keys, prob = lexical_table(src, tgt, 30)
    sums = torch.zeros(10).index_add_(0, torch.div(keys, 30, rounding_mode="floor"), prob)
    assert torch.allclose(sums[[0, 4, 5, 6, 7, 8]], torch.ones(6))
    assert int(shortlist.by_frequency[0]) in (EOS_ID, 24)  # every sentence ends in EOS and has "the"


def test_the_table_is_the_same_in_chunks():
    src, tgt = toy_corpus(50)
    whole, chunked = lexical_table(src, tgt, 30), lexical_table(src, tgt, 30, chunk=7)
    assert torch.equal(whole[0], chunked[0]) and torch.allclose(whole[1], chunked[1])


def make_shortlist(src_vocab=256, tgt_vocab=256, k=3, frequent=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    candidates = torch.randint(4, tgt_vocab, (src_vocab, k), generator=g)
    return Shortlist(candidates, torch.randperm(tgt_vocab, generator=g), frequent)


def test_a_batch_vocabulary_holds_the_specials_frequent_and_candidate_tokens():
    shortlist = make_shortlist()
    src = random_sources(3, vocab=256).src
    vocab = shortlist.for_batch(src)[0]
    assert torch.equal(vocab, vocab.sort().values) and vocab.unique().numel() == vocab.numel()
    assert vocab.numel() % SUBSET_MULTIPLE == 0 and vocab.numel() < 256
    assert torch.equal(vocab[:4], torch.arange(4))
    members = set(vocab.tolist())
    assert set(shortlist.candidates[src.reshape(-1)].reshape(-1).tolist()) <= members
    assert set(shortlist.candidates[PAD_ID].tolist()) <= members
    assert set(shortlist.by_frequency[:5].tolist()) <= members
    # the top-up takes the next most frequent tokens
    assert int(shortlist.by_frequency[5]) in members
    # a batch that needs more than the vocabulary's last multiple gets all of it
    assert torch.equal(shortlist.for_batch(torch.arange(256))[0], torch.arange(256))


def test_save_and_load_round_trip_and_errors(tmp_path):
    shortlist = make_shortlist(src_vocab=40, tgt_vocab=50)
    shortlist.save(tmp_path / "shortlist.safetensors")
    loaded = Shortlist.load(tmp_path / "shortlist.safetensors", 40, 50)
    assert torch.equal(loaded.candidates, shortlist.candidates)
    assert torch.equal(loaded.by_frequency, shortlist.by_frequency) and loaded.frequent == 5
    with pytest.raises(ModelDirError, match="built for vocabularies of 40 / 50 tokens, the model has 40 / 60"):
        Shortlist.load(tmp_path / "shortlist.safetensors", 40, 60)
    with pytest.raises(ModelDirError, match="no shortlist; build one with seq2seq-shortlist"):
        Shortlist.load(tmp_path / "missing.safetensors", 40, 50)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelDirError, match="damaged or not a shortlist"):
        Shortlist.load(tmp_path / "bad.safetensors", 40, 50)


# --- decoding over a shortlist ---------------------------------------------------------------------
def decode(model, batch, vocab=None, allowed=None, **cfg):
    cfg = SearchConfig(**{"max_len_a": 1.0, "max_len_b": 4, **cfg})
    return search(model, batch.src, batch.src_len, cfg, n_best=cfg.beam_size, return_attention=True, vocab=vocab,
                  allowed=allowed)


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("attention", ["bahdanau", "luong_general", "none"])
def test_the_whole_vocabulary_as_a_shortlist_changes_nothing(beam, attention):
    model, batch = make_model(attention=attention, vocab=256), random_sources(5, vocab=256)
    plain, cut = decode(model, batch, beam_size=beam), decode(model, batch, torch.arange(256), beam_size=beam)
    def summary(hyps):
        return [(h.tokens, h.score, h.normalized_score) for h in hyps]

    for a, b in zip(plain, cut):
        assert summary(a) == summary(b)
        for x, y in zip(a, b):
            assert (x.attention is None and y.attention is None) or torch.equal(x.attention, y.attention)


class MaskedOutput:
    """The reference: the model's full output layer with every token outside ``vocab`` at -inf."""

    def __init__(self, model, vocab):
        self.model, self.vocab = model, vocab

    def encode(self, src, src_len):
        return self.model.encode(src, src_len)

    def init_state(self, enc):
        return self.model.init_state(enc)

    def step(self, prev_tokens, state, enc):
        logits, state, attn = self.model.step(prev_tokens, state, enc)
        masked = torch.full_like(logits, float("-inf"))
        masked[:, self.vocab] = logits[:, self.vocab]
        return masked, state, attn


@pytest.mark.parametrize("beam,constraints", [(1, {}), (3, {}), (3, dict(min_len=2, no_repeat_ngram=2)),
                                              (1, dict(min_len=3, forbid_unk=True))])
@pytest.mark.parametrize("attention", ["bahdanau", "luong_general"])
def test_a_shortlist_decodes_as_the_full_model_with_the_other_tokens_masked(beam, constraints, attention):
    model, batch = make_model(attention=attention, vocab=256, unk_bias=2.0), random_sources(6, vocab=256)
    vocab = torch.cat([torch.arange(4), torch.arange(40, 56), torch.arange(130, 174)])
    cut = decode(model, batch, vocab, beam_size=beam, **constraints)
    reference = decode(MaskedOutput(model, vocab), batch, beam_size=beam, **constraints)
    assert [[h.tokens for h in hyps] for hyps in cut] == [[h.tokens for h in hyps] for hyps in reference]
    assert any(len(hyps[0].tokens) > 2 for hyps in cut)  # real searches, not one step to EOS
    for hyps, ref in zip(cut, reference):
        for h, r in zip(hyps, ref):
            assert h.score == pytest.approx(r.score, abs=1e-4)
            assert torch.allclose(h.attention, r.attention, atol=1e-6)


@pytest.mark.parametrize("beam", [1, 4])
def test_decoding_over_a_shortlist_keeps_to_it_and_to_the_constraints(beam):
    model, batch = make_model(vocab=256, unk_bias=3.0), random_sources(6, vocab=256)
    vocab = torch.cat([torch.arange(4), torch.arange(64, 124)])
    found = decode(model, batch, vocab, beam_size=beam, min_len=3, forbid_unk=True)
    allowed = set(vocab.tolist())
    for hyps in found:
        assert len(hyps) == beam
        for hyp in hyps:
            assert set(hyp.tokens) <= allowed and UNK_ID not in hyp.tokens and len(hyp.tokens) >= 3
    with pytest.raises(ValueError, match="starts with the special ids"):
        decode(model, batch, torch.arange(4, 100))


@pytest.mark.parametrize("variant", ["int8", "bf16"])
def test_int8_and_bf16_models_decode_over_a_shortlist(variant):
    model, batch = make_model(vocab=256), random_sources(4, vocab=256)
    vocab = torch.cat([torch.arange(4), torch.arange(64, 124)])
    if variant == "int8":
        model = quantize_int8(model)
    else:
        model.decoder.bf16_products = True
    found = decode(model, batch, vocab, beam_size=2)
    assert all(set(h.tokens) <= set(vocab.tolist()) for hyps in found for h in hyps)


def test_an_ensemble_decodes_over_a_shortlist():
    from seq2seq.ensemble import Ensemble

    first, batch = make_model(vocab=256), random_sources(4, vocab=256)
    ensemble = Ensemble([first, make_model(vocab=256, seed=1)])
    plain, cut = decode(ensemble, batch, beam_size=2), decode(ensemble, batch, torch.arange(256), beam_size=2)
    assert [[h.tokens for h in hyps] for hyps in plain] == [[h.tokens for h in hyps] for hyps in cut]
    vocab = torch.cat([torch.arange(4), torch.arange(64, 124)])
    assert all(set(h.tokens) <= set(vocab.tolist()) for hyps in decode(ensemble, batch, vocab, beam_size=2)
               for h in hyps)


def test_each_sentence_keeps_to_its_own_shortlist_whatever_its_batch():
    """With ``allowed``, a sentence decodes as it would alone (or in any other batch)."""
    model, batch = make_model(vocab=256, eos_bias=1.0), random_sources(6, vocab=256)
    shortlist = make_shortlist(k=4, frequent=8)
    vocab, allowed = shortlist.for_batch(batch.src)
    assert allowed[:, :4].all() and not allowed.all()  # the batch's vocabulary is more than each sentence's
    for beam in (1, 3):
        together = decode(model, batch, vocab, beam_size=beam, allowed=allowed)
        for i in range(6):
            alone = make_batch([batch.src[i, : int(batch.src_len[i])].tolist()])
            own, own_allowed = shortlist.for_batch(alone.src)
            found = decode(model, alone, own, beam_size=beam, allowed=own_allowed)
            assert [h.tokens for h in found[0]] == [h.tokens for h in together[i]]
            assert [h.score for h in found[0]] == pytest.approx([h.score for h in together[i]], abs=1e-4)
            own_tokens = set(own[own_allowed[0]].tolist())
            assert all(set(h.tokens) <= own_tokens for h in together[i])
    with pytest.raises(ValueError, match="allows the special ids"):
        decode(model, batch, vocab, allowed=torch.zeros_like(allowed))
    with pytest.raises(ValueError, match="allowed needs the batch's vocab"):
        decode(model, batch, allowed=allowed)
