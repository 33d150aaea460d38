"""Model behaviour: overfitting, forward == step loop, masks, packing, bridges."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.batch import make_batch
from seq2seq.config import ConfigError, SearchConfig
from seq2seq.models import loss_kernel, output_loss
from seq2seq.models.seq2seq import Seq2Seq, sequence_loss
from seq2seq.search import greedy_search
from tests.conftest import tiny_model_config

CELLS = ("rnn", "gru", "lstm")
MODES = ("none", "bahdanau", "luong_dot", "luong_general", "luong_concat")


def random_batch(vocab: int, lengths, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
    tgt = [torch.randint(4, vocab, (n + 1,), generator=g).tolist() for n in lengths]
    return make_batch(src, tgt), src, tgt


@pytest.mark.parametrize("cell,attention", list(itertools.product(CELLS, MODES)))
def test_tiny_model_overfits_a_few_pairs_exactly(cell, attention):
    torch.manual_seed(0)
    cfg = tiny_model_config(cell=cell, attention=attention, emb_size=32, enc_hidden_size=32, dec_hidden_size=32)
    model = Seq2Seq(cfg, 14, 14)
    batch, src, tgt = random_batch(14, [3, 5, 4, 6], seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        loss = sequence_loss(model(batch.src, batch.src_len, batch.tgt_in), batch.tgt_out) / batch.num_tgt_tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.eval()
    hyps = greedy_search(model, batch.src, batch.src_len, SearchConfig(max_len_a=2, max_len_b=3))
    assert [h[0].tokens for h in hyps] == tgt


@pytest.mark.parametrize("cell,attention,feeding", [
    (c, m, f) for c in CELLS for m in MODES for f in ((True, False) if m != "none" else (False,))])
def test_teacher_forced_forward_equals_step_loop(cell, attention, feeding):
    torch.manual_seed(1)
    cfg = tiny_model_config(cell=cell, attention=attention, input_feeding=feeding, dec_layers=2, enc_layers=2)
    model = Seq2Seq(cfg, 20, 20).eval()
    batch, _, _ = random_batch(20, [4, 7, 2], seed=2)
    with torch.no_grad():
        enc = model.encode(batch.src, batch.src_len)
        forward_logits, forward_attn = model.decoder(batch.tgt_in, enc, return_attention=True)
        state, step_logits, step_attn = model.init_state(enc), [], []
        for t in range(batch.tgt_in.size(1)):
            logits, state, attn = model.step(batch.tgt_in[:, t], state, enc)
            step_logits.append(logits)
            step_attn.append(attn)
    assert torch.allclose(forward_logits, torch.stack(step_logits, 1), atol=1e-5)
    if attention != "none":
        assert torch.allclose(forward_attn, torch.stack(step_attn, 1), atol=1e-6)


@pytest.mark.parametrize("attention", ["none", "luong_dot", "luong_general", "luong_concat"])
def test_fused_decoder_equals_loop(attention):
    torch.manual_seed(2)
    model = Seq2Seq(tiny_model_config(cell="lstm", attention=attention, input_feeding=False, dec_layers=2), 20, 20)
    model.eval()
    assert model.decoder.can_fuse
    batch, _, _ = random_batch(20, [5, 3, 8], seed=3)
    with torch.no_grad():
        fused = model(batch.src, batch.src_len, batch.tgt_in, fused=True)
        looped = model(batch.src, batch.src_len, batch.tgt_in, fused=False)
    assert torch.allclose(fused, looped, atol=1e-5)


@pytest.mark.parametrize("attention", ["bahdanau", "luong_general", "luong_concat"])
def test_padding_gets_no_attention_and_changes_nothing(attention):
    torch.manual_seed(3)
    model = Seq2Seq(tiny_model_config(attention=attention), 20, 20).eval()
    short = [5, 6, 7]
    alone = make_batch([short], [[8, 9]])
    padded = make_batch([short, [4, 5, 6, 7, 8, 9, 10, 11]], [[8, 9], [8, 9]])
    with torch.no_grad():
        logits_alone, attn_alone = model.decoder(alone.tgt_in, model.encode(alone.src, alone.src_len),
                                                 return_attention=True)
        logits_pad, attn_pad = model.decoder(padded.tgt_in, model.encode(padded.src, padded.src_len),
                                             return_attention=True)
    assert torch.all(attn_pad[0, :, len(short):] == 0)
    assert torch.allclose(logits_alone[0], logits_pad[0], atol=1e-5)
    assert torch.allclose(attn_alone[0], attn_pad[0, :, : len(short)], atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_batch_equals_unpadded_single_sentences(cell):
    torch.manual_seed(4)
    model = Seq2Seq(tiny_model_config(cell=cell, enc_layers=2), 20, 20).eval()
    batch, src, _ = random_batch(20, [6, 2, 4], seed=4)
    with torch.no_grad():
        packed = model.encoder(batch.src, batch.src_len, packed=True)
        for i, seq in enumerate(src):
            single = model.encoder(torch.tensor([seq]), torch.tensor([len(seq)]), packed=False)
            assert torch.allclose(packed.memory[i, : len(seq)], single.memory[0], atol=1e-5)
            assert torch.all(packed.memory[i, len(seq):] == 0)
            assert torch.allclose(packed.final[:, i], single.final[:, 0], atol=1e-5)


@pytest.mark.parametrize("cell,bidirectional", [("gru", True), ("rnn", True), ("gru", False)])
def test_encoder_by_direction_equals_packed_sequences_with_gradients(cell, bidirectional):
    """The GRU / RNN encoder's per-direction path gives the packed path's states and gradients."""
    torch.manual_seed(5)
    model = Seq2Seq(tiny_model_config(cell=cell, enc_layers=2, bidirectional=bidirectional), 20, 20).train()
    encoder = model.encoder
    batch, _, _ = random_batch(20, [7, 2, 5, 7], seed=5)
    embedded = encoder.embedding(batch.src)
    mask = batch.src != 0
    memory, final = encoder._by_direction(embedded, batch.src_len, mask)
    packed = pack_padded_sequence(embedded, batch.src_len, batch_first=True, enforce_sorted=False)
    out, final_ref = encoder.rnn(packed)
    memory_ref, _ = pad_packed_sequence(out, batch_first=True, total_length=batch.src.size(1))
    assert torch.allclose(memory, memory_ref, atol=1e-6) and torch.all(memory[~mask] == 0)
    assert torch.allclose(final, final_ref, atol=1e-6)
    weights = torch.randn_like(memory)
    grads = torch.autograd.grad((memory * weights).sum() + final.sum(), list(encoder.rnn.parameters()))
    grads_ref = torch.autograd.grad((memory_ref * weights).sum() + final_ref.sum(), list(encoder.rnn.parameters()))
    for grad, grad_ref in zip(grads, grads_ref):
        assert torch.allclose(grad, grad_ref, atol=1e-5)


@pytest.mark.parametrize("bridge,enc_layers,dec_layers", [
    ("learned", 1, 2), ("copy", 2, 2), ("copy", 1, 3), ("copy", 3, 2), ("zeros", 1, 1)])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bridges_build_the_decoder_state(bridge, enc_layers, dec_layers, cell):
    torch.manual_seed(5)
    model = Seq2Seq(tiny_model_config(cell=cell, bridge=bridge, enc_layers=enc_layers, dec_layers=dec_layers), 20, 20)
    batch, _, _ = random_batch(20, [3, 5], seed=5)
    enc = model.encode(batch.src, batch.src_len)
    state = model.init_state(enc)
    assert state.hidden.shape == (dec_layers, 2, 16)
    assert (state.cell is not None) == (cell == "lstm")
    if bridge == "zeros":
        assert torch.all(state.hidden == 0)
    if bridge == "copy" and enc_layers >= dec_layers:
        assert torch.equal(state.hidden, enc.final[-dec_layers:])
    elif bridge == "copy":
        assert torch.equal(state.hidden[:enc_layers], enc.final)
        assert all(torch.equal(state.hidden[i], enc.final[-1]) for i in range(enc_layers, dec_layers))


def test_tied_and_shared_embeddings_are_one_parameter():
    model = Seq2Seq(tiny_model_config(tie_embeddings=True, share_embeddings=True), 20, 20)
    assert model.decoder.output.weight is model.decoder.embedding.weight
    assert model.encoder.embedding is model.decoder.embedding


@pytest.mark.parametrize("shared", [False, True])
def test_uniform_init_bounds_every_parameter_and_keeps_padding_zero(shared):
    torch.manual_seed(5)
    default = Seq2Seq(tiny_model_config(), 20, 20)
    assert default.decoder.embedding.weight.abs().max() > 1.0  # PyTorch's N(0, 1) embeddings
    model = Seq2Seq(tiny_model_config(init="uniform", init_range=0.05, tie_embeddings=shared,
                                      share_embeddings=shared), 20, 20)
    for name, parameter in model.named_parameters():
        assert parameter.abs().max() <= 0.05 and parameter.abs().max() > 0.04, name  # spread over the range
    for embedding in (model.encoder.embedding, model.decoder.embedding):
        assert not embedding.weight[0].any()  # the padding row
    with pytest.raises(ConfigError, match="model.init_range"):
        tiny_model_config(init="uniform", init_range=0.0)


def test_scheduled_sampling_trains():
    torch.manual_seed(6)
    model = Seq2Seq(tiny_model_config(), 20, 20)
    batch, _, _ = random_batch(20, [3, 4], seed=6)
    logits = model(batch.src, batch.src_len, batch.tgt_in, teacher_forcing=0.5)
    assert logits.shape == (2, batch.tgt_in.size(1), 20)
    sequence_loss(logits, batch.tgt_out).backward()
    assert model.decoder.embedding.weight.grad is not None


def test_dropout_active_only_in_training():
    torch.manual_seed(7)
    model = Seq2Seq(tiny_model_config(dropout=0.5, emb_dropout=0.5), 20, 20)
    batch, _, _ = random_batch(20, [4, 4], seed=7)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch.src, batch.src_len, batch.tgt_in), model(batch.src, batch.src_len, batch.tgt_in))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(batch.src, batch.src_len, batch.tgt_in),
                               model(batch.src, batch.src_len, batch.tgt_in))


@pytest.fixture(params=["kernel", "aten"])
def loss_path(request, monkeypatch):
    """The chunked loss's CPU softmax by its C kernel (where it can be built), and by ATen."""
    if request.param == "aten":
        monkeypatch.setattr(loss_kernel.LIBRARY, "_loaded", {"functions": None})
    return request.param


@pytest.mark.parametrize("label_smoothing,tie", [(0.0, False), (0.1, False), (0.1, True)])
def test_chunked_output_loss_equals_logits_and_cross_entropy(label_smoothing, tie, loss_path, monkeypatch):
    monkeypatch.setattr(output_loss, "CHUNK_ROWS", 4)  # several chunks, the last one short
    monkeypatch.setattr(output_loss, "CHUNK_LOGITS", 4 * 20 + 1)  # float32: 4 rows of the 20-word vocabulary
    torch.manual_seed(4)
    model = Seq2Seq(tiny_model_config(attention="bahdanau", tie_embeddings=tie), 20, 20).eval()
    batch, _, _ = random_batch(20, [5, 3, 8], seed=5)
    params = [p for p in model.parameters()]

    def loss_and_grads(loss):
        return [loss.detach()] + list(torch.autograd.grad(loss * 0.7, params))

    plain = sequence_loss(model(batch.src, batch.src_len, batch.tgt_in), batch.tgt_out, label_smoothing)
    chunked = model(batch.src, batch.src_len, batch.tgt_in, tgt_out=batch.tgt_out, label_smoothing=label_smoothing)
    (loss_plain, *grads_plain), (loss_chunked, *grads_chunked) = loss_and_grads(plain), loss_and_grads(chunked)
    assert torch.allclose(loss_plain, loss_chunked, rtol=1e-5)
    for a, b in zip(grads_plain, grads_chunked):  # a tied weight's two gradients add in another order: 6e-5 apart
        assert torch.allclose(a, b, rtol=2e-4, atol=1e-6)  # on an AVX2 CPU (AMD EPYC)
    with torch.no_grad():  # validation: the same loss, no gradients computed
        again = model(batch.src, batch.src_len, batch.tgt_in, tgt_out=batch.tgt_out, label_smoothing=label_smoothing)
    assert torch.allclose(again, plain.detach(), rtol=1e-5)


def test_chunks_hold_a_fixed_number_of_logits_but_bfloat16_on_the_cpu_a_fixed_number_of_rows():
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert output_loss.chunk_rows_for(device, 8000) == 1048 > output_loss.CHUNK_ROWS
        assert output_loss.chunk_rows_for(device, 8192) == 1023  # 1,024 would be 32 MiB, beyond glibc's reuse
        assert output_loss.chunk_rows_for(device, 10**6) == output_loss.CHUNK_ROWS  # never fewer
    assert output_loss.chunk_rows_for(torch.device("cpu"), 8000, low_precision=True) == output_loss.CHUNK_ROWS
    assert output_loss.chunk_rows_for(torch.device("cuda"), 8000, low_precision=True) == 1048


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_output_loss_of_a_target_far_below_the_rest(label_smoothing, with_bias, loss_path):
    """ATen's path takes log p(target) from the softmax, which overwrites the logits; a target with log p < -110
    (p is 0 in float32) still gets its exact loss (its row's logits computed again; the kernel takes the
    log-sum-exp from the softmax's maximum and sum), and a finite gradient."""
    torch.manual_seed(7)
    x, weight = torch.randn(6, 8), torch.randn(10, 8)
    bias = torch.randn(10) if with_bias else None
    x[2] = weight[3] * 80  # row 2 puts logit 3 far above the rest
    target = torch.tensor([1, 4, 5, 0, 9, 2])  # row 2's target is another token (0 is padding: ignored)
    x.requires_grad_(True)
    expected = F.cross_entropy(F.linear(x, weight, bias), target, ignore_index=0, reduction="sum",
                               label_smoothing=label_smoothing)
    assert (x[2] @ weight.t()).max() - (x[2] @ weight[5]) > 110
    loss = output_loss.linear_cross_entropy(x, weight, bias, target, label_smoothing)
    assert torch.allclose(loss, expected, rtol=1e-5)
    grad, expected_grad = torch.autograd.grad(loss, x)[0], torch.autograd.grad(expected, x)[0]
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_chunked_output_loss_in_bfloat16_is_close(label_smoothing, loss_path, monkeypatch):
    """Loss and gradients; chunks of 8 rows (the rows padded to whole chunks), weight gradients over groups
    of 2 chunks (the last one part); the softmax by the C kernel (bfloat16 in and out) and by ATen."""
    monkeypatch.setattr(output_loss, "CHUNK_ROWS", 8)
    monkeypatch.setattr(output_loss, "LOW_PRECISION_GROUP_ROWS", 16)
    torch.manual_seed(6)
    x, weight, bias = torch.randn(37, 16), torch.randn(30, 16) * 0.3, torch.randn(30)  # 37: padded to 40
    target = torch.randint(0, 30, (37,))
    target[[3, 17]] = 0  # padding
    grads = []
    for low_precision in (None, torch.bfloat16):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        loss = output_loss.linear_cross_entropy(*leaves, target, label_smoothing, low_precision=low_precision)
        grads.append([loss.detach()] + list(torch.autograd.grad(loss * 0.5, leaves)))
    exact = sequence_loss(F.linear(x, weight, bias)[None], target[None], label_smoothing)
    assert torch.allclose(grads[0][0], exact, rtol=1e-5)
    # the loss itself is closer than the gradients (0.05 of 152 here; the softmax written over its logits: 0.6)
    assert torch.allclose(grads[1][0], exact, rtol=1e-3)
    for exact_value, low_value in zip(*grads):
        assert torch.allclose(low_value, exact_value, rtol=2e-2, atol=2e-2) and not torch.equal(low_value, exact_value)


@pytest.mark.parametrize("cell", CELLS)
def test_written_out_cell_equals_the_torch_rnn_module(cell):
    torch.manual_seed(7)
    model = Seq2Seq(tiny_model_config(cell=cell, attention="bahdanau", input_feeding=True, dec_layers=2), 20, 20)
    decoder = model.decoder.eval()
    batch, _, _ = random_batch(20, [4, 6], seed=8)
    with torch.no_grad():
        enc = model.encode(batch.src, batch.src_len)
        state = decoder.init_state(enc)
        state.feed.normal_()
        embedded = decoder.embed(batch.tgt_in[:, 0])
        written_out = decoder.recur(embedded, state, enc)
        monkey = type(decoder).manual_cell
        try:
            type(decoder).manual_cell = property(lambda self: False)  # the nn.GRU / nn.LSTM / nn.RNN module
            module = decoder.recur(embedded, state, enc)
        finally:
            type(decoder).manual_cell = monkey
    assert torch.allclose(written_out[0], module[0], atol=1e-6)
    assert torch.allclose(written_out[2].hidden, module[2].hidden, atol=1e-6)
    if cell == "lstm":
        assert torch.allclose(written_out[2].cell, module[2].cell, atol=1e-6)
    # decoding keeps the cell's weights between steps; a changed weight must not be served from there
    with torch.no_grad():
        decoder.rnn.weight_ih_l0.mul_(0.5)
        decoder.rnn.weight_hh_l1.mul_(0.5)
        changed = decoder.recur(embedded, state, enc)[0]
        fresh = Seq2Seq(model.decoder.cfg, 20, 20).decoder.eval()
        fresh.load_state_dict(decoder.state_dict())
        assert torch.allclose(changed, fresh.recur(embedded, state, enc)[0], atol=1e-6)
        assert not torch.allclose(changed, written_out[0], atol=1e-3)


def loss_and_gradients(model, batch) -> list:
    """The summed training loss and the gradient of every parameter, in train mode without dropout."""
    model.train()
    loss = model(batch.src, batch.src_len, batch.tgt_in, tgt_out=batch.tgt_out)
    return [loss.detach()] + list(torch.autograd.grad(loss, list(model.parameters())))


def test_compiled_step_equals_eager():
    """trainer.compile: torch.compile of the step gives the same loss and gradients (CPU, inductor)."""
    torch.manual_seed(9)
    model = Seq2Seq(tiny_model_config(attention="bahdanau", input_feeding=True, dec_layers=2), 20, 20)
    batch, _, _ = random_batch(20, [5, 3, 8], seed=10)
    eager = loss_and_gradients(model, batch)
    model.decoder.compile_step = True
    compiled = loss_and_gradients(model, batch)
    other = random_batch(20, [2, 9, 4, 6], seed=11)[0]  # other sizes: no recompilation needed
    model.decoder.compile_step = False
    expected = loss_and_gradients(model, other)
    model.decoder.compile_step = True
    for a, b in zip(eager + expected, compiled + loss_and_gradients(model, other)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention,feeding", [("bahdanau", False), ("luong_concat", True)])
def test_attention_gradients_summed_once_equal_per_step_ones(attention, feeding, monkeypatch):
    """Training's decoder loop sums the additive attention's keys', v's and memory's gradients over the steps
    in one call (additive_kernel.StepGradients): the loss and every gradient equal those of per-step calls."""
    from seq2seq.models import additive_kernel
    from seq2seq.models.attention import AdditiveAttention

    if not additive_kernel.usable(torch.zeros(1)):
        pytest.skip("the additive attention kernel is not built here")
    torch.manual_seed(12)
    model = Seq2Seq(tiny_model_config(attention=attention, input_feeding=feeding, dec_layers=2), 20, 20)
    batch, _, _ = random_batch(20, [5, 3, 8, 1], seed=13)
    calls = []
    summed = additive_kernel.StepGradients.gradients
    monkeypatch.setattr(additive_kernel.StepGradients, "gradients", lambda self: calls.append(1) or summed(self))
    once = loss_and_gradients(model, batch)
    assert calls == [1]  # the summed path ran, once per batch
    monkeypatch.setattr(AdditiveAttention, "step_gradients", lambda self, *args: None)
    per_step = loss_and_gradients(model, batch)
    assert calls == [1]
    for a, b in zip(once, per_step):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_lengths", [[5, 3, 8, 1], [1]])
def test_decoder_loop_as_one_node_equals_the_step_by_step_path(batch_lengths, monkeypatch):
    """The peers' decoder (GRU, luong_concat, input feeding, one layer) trains through decoder_loop.DecoderLoop:
    pre-outputs, attention weights and every gradient (through both) equal the step-by-step path's."""
    from seq2seq.models import decoder_loop

    torch.manual_seed(14)
    model = Seq2Seq(tiny_model_config(attention="luong_concat", input_feeding=True, dec_layers=1), 20, 20).train()
    batch, _, _ = random_batch(20, batch_lengths, seed=15)
    if not decoder_loop.usable(model.decoder, torch.zeros(1)):
        pytest.skip("the C kernels are not built here")
    parameters = [p for name, p in model.named_parameters() if not name.startswith("decoder.output")]
    results = []
    for fused in (True, False):
        enc = model.decoder.prepare(model.encode(batch.src, batch.src_len))
        monkeypatch.setattr(decoder_loop, "usable", (lambda *args: True) if fused else (lambda *args: False))
        calls = []
        monkeypatch.setattr(decoder_loop.DecoderLoop, "apply", lambda *a, f=decoder_loop.DecoderLoop.apply: (
            calls.append(1), f(*a))[1])
        pre, attn = model.decoder.pre_outputs(batch.tgt_in, enc)
        assert len(calls) == int(fused)
        generator = torch.Generator().manual_seed(16)
        loss = (pre * torch.randn(pre.shape, generator=generator)).sum() + (attn * torch.randn(
            attn.shape, generator=generator)).sum()
        grads = torch.autograd.grad(loss, parameters)
        results.append([pre.detach(), attn.detach()] + list(grads))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
