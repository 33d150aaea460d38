"""Fast products: bfloat16 (autocast, trainer.precision=bf16, translate --bf16) close to float32, and float32
decoding's packed output layer and looked-up embedding products equal to the plain products."""
import copy

import pytest
import torch

from seq2seq.config import SearchConfig
from seq2seq.models import decoder as decoder_module
from seq2seq.models import weight_cache
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.search import search
from tests.conftest import tiny_model_config
from tests.test_models import random_batch


def test_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(8)
    model = Seq2Seq(tiny_model_config(), 50, 50).eval()
    batch, _, _ = random_batch(50, [5, 3], seed=8)
    with torch.no_grad():
        full = model(batch.src, batch.src_len, batch.tgt_in)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(batch.src, batch.src_len, batch.tgt_in).float()
    assert not torch.equal(full, half)
    assert torch.allclose(torch.log_softmax(full, -1), torch.log_softmax(half, -1), atol=0.05)


def decoding_steps_fp32_and_bf16(model, batch):
    """Teacher-forced step loops, plain and as translate --bf16 runs them: (log-probs, final hidden) of each."""
    def step_loop():
        with torch.no_grad():
            enc = model.encode(batch.src, batch.src_len)
            state, out = model.init_state(enc), []
            for t in range(batch.tgt_in.size(1)):
                logits, state, _ = model.step(batch.tgt_in[:, t], state, enc)
                out.append(torch.log_softmax(logits, -1))
        return torch.stack(out, 1), state.hidden

    full = step_loop()
    model.decoder.bf16_products = True
    half = step_loop()
    model.decoder.bf16_products = False
    return full, half


def assert_bf16_steps_close(full, half):
    assert half[0].dtype == torch.float32 and not torch.equal(full[0], half[0])
    assert torch.allclose(full[0], half[0], atol=0.05) and torch.allclose(full[1], half[1], atol=0.02)


@pytest.mark.parametrize("cell,attention,feeding", [
    ("gru", "bahdanau", True), ("lstm", "luong_general", True), ("rnn", "luong_dot", False), ("gru", "none", False),
    ("gru", "luong_concat", True)])
def test_bf16_decoding_steps_are_close_to_fp32(cell, attention, feeding):
    """translate --bf16: every product of the step from bfloat16 weights cast once; the step loop stays close."""
    torch.manual_seed(3)
    cfg = tiny_model_config(cell=cell, attention=attention, input_feeding=feeding, dec_layers=2, enc_layers=2)
    model = Seq2Seq(cfg, 40, 40).eval()
    batch, _, _ = random_batch(40, [6, 3, 5], seed=4)
    full, half = decoding_steps_fp32_and_bf16(model, batch)
    cached = [v for name, (_, v) in model.decoder._decoding_cache.items()
              if isinstance(name, tuple) and name[0] == "bf16"]  # not "cell" or fp32's "packed output"
    # per layer its input and recurrent weights, the pre-output and output layers, the additive query projection
    additive = attention in ("bahdanau", "luong_concat")
    assert len(cached) == (7 if additive else 6) and all(w.dtype == torch.bfloat16 for w in cached)
    assert_bf16_steps_close(full, half)


@pytest.mark.parametrize("cell,attention,feeding", [("gru", "bahdanau", True), ("lstm", "luong_general", True),
                                                    ("gru", "none", False)])
def test_bf16_product_training_is_close_to_fp32_and_follows_the_weights(cell, attention, feeding):
    """trainer.precision=bf16 on the CPU: the decoder's products in bfloat16, and each forward pass sees the
    weights as the last optimizer step left them (a fused Adam step does not change a tensor's version)."""
    torch.manual_seed(12)
    model = Seq2Seq(tiny_model_config(cell=cell, attention=attention, input_feeding=feeding), 40, 40).train()
    model.decoder.dropout.p = model.decoder.emb_dropout.p = model.encoder.dropout.p = 0.0
    batch, _, _ = random_batch(40, [6, 3, 5], seed=12)
    params = list(model.parameters())

    def loss_and_grads(bf16):
        model.decoder.bf16_products = bf16
        loss = model(batch.src, batch.src_len, batch.tgt_in, tgt_out=batch.tgt_out)
        return [loss.detach()] + list(torch.autograd.grad(loss, params))

    for _ in range(2):
        full, half = loss_and_grads(False), loss_and_grads(True)
        assert not torch.equal(full[0], half[0])
        for a, b in zip(full, half):
            assert torch.allclose(a, b, rtol=0.05, atol=0.02 * a.abs().max().item())
        for p, grad in zip(params, full[1:]):
            p.grad = grad
        torch.optim.Adam(params, lr=0.05, fused=True).step()


@pytest.mark.skipif(not decoder_module.PACKED_LINEAR, reason="this torch has no oneDNN linear with a packed weight")
def test_float32_decoding_packs_the_output_weight_once_and_follows_it():
    torch.manual_seed(0)
    decoder = Seq2Seq(tiny_model_config(), 30, 40).eval().decoder
    pre_output = torch.randn(7, decoder.output.in_features)
    with torch.no_grad():
        logits = decoder.project(pre_output)
        torch.testing.assert_close(logits, decoder.output(pre_output), rtol=1e-5, atol=1e-5)
        packed = decoder._decoding_cache["packed output"][1]
        torch.testing.assert_close(decoder.project(pre_output.view(7, 1, -1))[:, 0], logits)  # any leading shape
        assert decoder._decoding_cache["packed output"][1] is packed  # packed once
        decoder.output.weight.mul_(2)  # a changed weight is packed again
        torch.testing.assert_close(decoder.project(pre_output) - decoder.output.bias,
                                   2 * (logits - decoder.output.bias), rtol=1e-5, atol=1e-5)
    copied = copy.deepcopy(decoder)  # as int8 quantisation copies a model: the packed weight stays behind
    assert not copied._decoding_cache and "packed output" in decoder._decoding_cache
    projected = decoder.project(pre_output.requires_grad_())  # training: the plain product, with gradients
    projected.sum().backward()
    assert decoder.output.weight.grad is not None and pre_output.grad is not None
    decoder._decoding_cache.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own product, not the packed one
        assert decoder.project(pre_output).dtype == torch.bfloat16 and not decoder._decoding_cache


@pytest.mark.skipif(not decoder_module.PACKED_LINEAR, reason="this torch has no oneDNN linear with a packed weight")
@pytest.mark.parametrize("beam", [1, 4])
def test_float32_decoding_with_the_packed_output_layer_finds_the_same_translations(beam, monkeypatch):
    torch.manual_seed(0)
    model = Seq2Seq(tiny_model_config(), 30, 30).eval()
    batch, _, _ = random_batch(30, [3, 7, 5, 9, 4, 6], seed=2)
    cfg = SearchConfig(beam_size=beam, max_len_a=1.5, max_len_b=3)
    packed = search(model, batch.src, batch.src_len, cfg, n_best=beam)
    assert "packed output" in model.decoder._decoding_cache
    monkeypatch.setattr(decoder_module, "PACKED_LINEAR", False)
    plain = search(model, batch.src, batch.src_len, cfg, n_best=beam)
    assert [[h.tokens for h in hyps] for hyps in packed] == [[h.tokens for h in hyps] for hyps in plain]
    for hyps_packed, hyps_plain in zip(packed, plain):
        assert [h.score for h in hyps_packed] == pytest.approx([h.score for h in hyps_plain], abs=1e-4)


@pytest.mark.parametrize("cell,attention", [("gru", "luong_concat"), ("lstm", "bahdanau")])
def test_float32_decoding_looks_up_the_embedding_products_in_a_table_that_follows_the_weights(cell, attention,
                                                                                              monkeypatch):
    torch.manual_seed(0)
    model = Seq2Seq(tiny_model_config(cell=cell, attention=attention, input_feeding=True), 30, 40).eval()
    decoder = model.decoder
    batch, _, _ = random_batch(30, [3, 7, 5], seed=1)
    tokens = torch.tensor([2, 5, 39])

    def first_step(table: bool):
        if not table:
            monkeypatch.setattr(decoder_module.Decoder, "_gates_of", lambda self, tokens: None)
        enc = model.encode(batch.src, batch.src_len)
        logits = model.step(tokens, model.init_state(enc), enc)[0]
        monkeypatch.undo()
        return logits

    with torch.no_grad():
        looked_up = first_step(table=True)
        table = decoder._decoding_cache["embedding gates"][1]
        assert table.shape == (40, (4 if cell == "lstm" else 3) * decoder.cfg.dec_hidden_size)
        torch.testing.assert_close(looked_up, first_step(table=False), rtol=1e-5, atol=1e-5)
        first_step(table=True)
        assert decoder._decoding_cache["embedding gates"][1] is table  # made once
        decoder.embedding.weight.mul_(2)  # a changed weight makes the table again
        torch.testing.assert_close(first_step(table=True), first_step(table=False), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(first_step(table=True), looked_up)
        decoder._decoding_cache.clear()
        monkeypatch.setattr(weight_cache, "MAX_TABLE_ELEMENTS", 40 * 3)  # too large a table: the plain product
        first_step(table=True)
        assert "embedding gates" not in decoder._decoding_cache
        monkeypatch.undo()
    enc = model.encode(batch.src, batch.src_len)  # with gradients: no table, and the embedding gets its gradient
    model.step(tokens, model.init_state(enc), enc)[0].sum().backward()
    assert "embedding gates" not in decoder._decoding_cache and decoder.embedding.weight.grad[39].abs().sum() > 0


@pytest.mark.parametrize("cell,attention,feeding,layers", [
    ("gru", "bahdanau", True, 1), ("lstm", "bahdanau", False, 2), ("gru", "luong_concat", True, 1),
    ("rnn", "luong_general", False, 2), ("lstm", "luong_dot", True, 1)])
def test_float32_decoding_takes_the_contexts_products_over_the_memory(cell, attention, feeding, layers, monkeypatch):
    """context_products: the memory multiplied once per batch by the weights that take the context; each step's
    logits and attention equal the plain step's, also after a weight changes, and beam search finds the same."""
    torch.manual_seed(0)
    cfg = tiny_model_config(cell=cell, attention=attention, input_feeding=feeding, dec_layers=layers,
                            enc_hidden_size=16 if attention == "luong_dot" else 24)
    model = Seq2Seq(cfg, 30, 40).eval()
    batch, _, _ = random_batch(30, [3, 7, 5], seed=1)

    def steps():
        enc = model.encode(batch.src, batch.src_len)
        projected = model.prepare_decoding(enc)
        plain_state, state, tokens = model.init_state(enc), model.init_state(projected), torch.tensor([2, 5, 39])
        for _ in range(4):
            plain_logits, plain_state, plain_attn = model.step(tokens, plain_state, enc)
            logits, state, attn = model.step(tokens, state, projected)
            torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(attn, plain_attn)
            tokens = plain_logits.argmax(-1)
        return projected.context_memory

    with torch.no_grad():
        gates = (4 if cell == "lstm" else 1 if cell == "rnn" else 3) * cfg.dec_hidden_size
        width = cfg.dec_hidden_size + (gates if attention == "bahdanau" else 0)
        assert steps().shape == (3, 7, width)
        decoder = model.decoder
        for parameter in (decoder.pre_output.weight, decoder.pre_output.bias, decoder.rnn.weight_ih_l0):
            parameter.mul_(1.5)  # the weights prepared once follow a change
            steps()
    enc = model.encode(batch.src, batch.src_len)
    assert model.prepare_decoding(enc).context_memory is None  # with gradients: the plain path
    search_cfg = SearchConfig(beam_size=3, max_len_a=1.5, max_len_b=3)
    projected = search(model, batch.src, batch.src_len, search_cfg, n_best=3)
    monkeypatch.setattr(Seq2Seq, "prepare_decoding", lambda self, enc: enc)
    plain = search(model, batch.src, batch.src_len, search_cfg, n_best=3)
    assert [[h.tokens for h in hyps] for hyps in projected] == [[h.tokens for h in hyps] for hyps in plain]
    for hyps_projected, hyps_plain in zip(projected, plain):
        assert [h.score for h in hyps_projected] == pytest.approx([h.score for h in hyps_plain], abs=1e-4)


def test_packed_products_pad_a_shrinking_batch_to_a_few_row_counts():
    from seq2seq.models.packed import padded_rows
    padded = [padded_rows(rows) for rows in range(1, 641)]
    assert all(rows <= p < rows * 1.25 + 8 and p % 8 == 0 for rows, p in zip(range(1, 641), padded))
    assert [padded_rows(rows) for rows in (1, 8, 9, 64, 65, 80, 81, 129, 257, 320)] == [8, 8, 16, 64, 80, 80, 96,
                                                                                          160, 320, 320]
    assert len(set(padded[:320])) == 8 + 4 + 4 + 1  # beam 5 of a batch of 64: 17 shapes, not 40
