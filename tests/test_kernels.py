"""The loss's softmax kernel and the GRU cell's kernel (seq2seq/models/csrc): results and gradients against
float64 ATen, independence from the thread count, models with and without them, and inputs they refuse."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from seq2seq.models import gru_kernel, loss_kernel
from seq2seq.models.seq2seq import Seq2Seq

from .conftest import tiny_model_config
from .test_models import random_batch

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")


def with_threads(count, function):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return function()
    finally:
        torch.set_num_threads(threads)


# --- the loss's softmax -------------------------------------------------------------------------
@needs_compiler
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("share", [-1.0, -0.9, 0.0])
def test_softmax_loss_matches_float64(with_bias, share):
    generator = torch.Generator().manual_seed(1)
    rows, vocab = 70, 53  # rows: two parts of the bias's gradient, the second short; 53 not a multiple of 8
    logits = torch.randn(rows, vocab, generator=generator) * 6
    logits[3, 7] = 150.0  # row 3: every other probability below float32's smallest normal number
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    target = torch.randint(0, vocab, (rows,), generator=generator)
    z = logits.double() + (0 if bias is None else bias.double())
    expected = torch.softmax(z, -1)
    expected[torch.arange(rows), target] += share
    found = logits.clone()
    lse, target_logit, logit_sum, bias_sums = loss_kernel.softmax_loss(found, bias, target, share, True)
    assert torch.allclose(found.double(), expected, atol=1e-6)
    others = (torch.arange(vocab) != 7) & (torch.arange(vocab) != target[3])
    assert (found[3][others] == 0).all()  # probabilities below float32's normal numbers written as 0, not denormal
    assert torch.allclose(lse.double(), z.logsumexp(-1), rtol=1e-6)
    assert torch.equal(target_logit, z[torch.arange(rows), target].float())
    assert torch.allclose(logit_sum.double(), z.sum(-1), rtol=1e-5, atol=1e-4)
    assert torch.allclose(bias_sums.double(), expected.sum(0), atol=1e-5)


@needs_compiler
def test_softmax_loss_is_the_same_on_any_number_of_threads():
    generator = torch.Generator().manual_seed(2)
    logits, bias = torch.randn(300, 200, generator=generator), torch.randn(200, generator=generator)
    target = torch.randint(0, 200, (300,), generator=generator)
    assert logits.numel() >= loss_kernel.PARALLEL_ELEMENTS

    def run():
        found = logits.clone()
        return [found, *loss_kernel.softmax_loss(found, bias, target, -1.0, True)]

    for one, three in zip(with_threads(1, run), with_threads(3, run)):
        assert torch.equal(one, three)


@needs_compiler
@pytest.mark.parametrize("in_place", [False, True])
def test_softmax_loss_of_bfloat16_logits_matches_float64(in_place):
    """bfloat16 logits in, the result rounded once to bfloat16, the bias added in float32, the rows' figures
    in float32; rows split over threads."""
    generator = torch.Generator().manual_seed(3)
    rows, vocab = 150, 301
    logits = (torch.randn(rows, vocab, generator=generator) * 6).bfloat16()
    logits[3, 7] = 150.0
    bias, target = torch.randn(vocab, generator=generator), torch.randint(0, vocab, (rows,), generator=generator)
    z = logits.double() + bias.double()
    expected = torch.softmax(z, -1)
    expected[torch.arange(rows), target] += -0.9
    source = logits.clone()

    def run():
        out = source if in_place else torch.full_like(logits, float("nan"))
        return [out, *loss_kernel.softmax_loss(source, bias, target, -0.9, True, out=out)]

    found, lse, target_logit, logit_sum, bias_sums = with_threads(2, run)
    if not in_place:
        assert torch.equal(source, logits)  # the logits are left as they were
    assert found.dtype == torch.bfloat16
    # rounded once from float32: within one bfloat16 step (2^-8 relative) of the float64 result
    assert torch.allclose(found.double(), expected, rtol=2**-8, atol=1e-7)
    assert (found.double() - expected).abs().max() > 0  # rounded, not kept in float32
    assert torch.allclose(lse.double(), z.logsumexp(-1), rtol=1e-6)
    assert torch.allclose(target_logit.double(), z[torch.arange(rows), target], rtol=1e-6)
    assert torch.allclose(logit_sum.double(), z.sum(-1), rtol=1e-5, atol=1e-3)
    assert torch.allclose(bias_sums.double(), expected.sum(0), atol=1e-5)  # from float32, before rounding
    assert [t.dtype for t in (lse, target_logit, logit_sum, bias_sums)] == [torch.float32] * 4
    if not in_place:
        one = with_threads(1, run)
        assert all(torch.equal(a, b) for a, b in zip(one, [found, lse, target_logit, logit_sum, bias_sums]))


@needs_compiler
def test_softmax_loss_refuses_what_it_cannot_read():
    logits, target = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="do not fit"):
        loss_kernel.softmax_loss(logits.t(), None, target, -1.0, False)  # not contiguous
    with pytest.raises(ValueError, match="do not fit"):
        loss_kernel.softmax_loss(logits, torch.zeros(9), target, -1.0, True)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        loss_kernel.softmax_loss(logits.half(), None, target, -1.0, False)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        loss_kernel.softmax_loss(logits.bfloat16(), None, target, -1.0, False, out=logits)
    with pytest.raises(ValueError, match="float32 bias"):
        loss_kernel.softmax_loss(logits.bfloat16(), torch.zeros(10).bfloat16(), target, -1.0, False)
    with pytest.raises(ValueError, match="in place"):
        loss_kernel.softmax_loss(logits, None, target, -1.0, False, out=logits.clone())
    with pytest.raises(ValueError, match="do not fit"):
        loss_kernel.softmax_loss(logits.bfloat16(), None, target, -1.0, False, out=torch.empty(4, 9).bfloat16())
    with pytest.raises(IndexError, match="outside the vocabulary of 10"):
        loss_kernel.softmax_loss(logits, None, torch.tensor([1, 2, 10, 4]), -1.0, False)


# --- the GRU cell ---------------------------------------------------------------------------------
def gru_reference(gates_in, gates_h, h):
    in_r, in_z, in_n = gates_in.chunk(3, -1)
    h_r, h_z, h_n = gates_h.chunk(3, -1)
    reset, update = torch.sigmoid(in_r + h_r), torch.sigmoid(in_z + h_z)
    candidate = torch.tanh(in_n + reset * h_n)
    return candidate + update * (h - candidate)


@needs_compiler
@pytest.mark.parametrize("batch,size", [(5, 16), (9, 37), (70, 256)])  # 37: not a multiple of the SIMD width
def test_gru_cell_and_its_gradients_match_float64(batch, size):
    generator = torch.Generator().manual_seed(3)
    steps = torch.randn(batch, 3, 3 * size, generator=generator) * 3  # gates_in: a time step of [B, T, 3H]
    gates_h, h = torch.randn(batch, 3 * size, generator=generator) * 3, torch.randn(batch, size, generator=generator)
    grad = torch.randn(batch, size, generator=generator)
    results = []
    for dtype, cell in ((torch.float64, gru_reference), (torch.float32, gru_kernel.gru_cell)):
        leaves = [t.to(dtype).requires_grad_() for t in (steps, gates_h, h)]
        out = cell(leaves[0][:, 1], leaves[1], leaves[2])
        out.backward(grad.to(dtype))
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for expected, found in zip(*results):
        assert torch.allclose(found.double(), expected, atol=2e-6)


@needs_compiler
def test_gru_cell_is_the_same_on_any_number_of_threads():
    generator = torch.Generator().manual_seed(4)
    gates_in, gates_h = torch.randn(80, 768, generator=generator), torch.randn(80, 768, generator=generator)
    h = torch.randn(80, 256, generator=generator)
    assert h.numel() >= gru_kernel.PARALLEL_ELEMENTS

    def run():
        leaves = [t.clone().requires_grad_() for t in (gates_in, gates_h, h)]
        out = gru_kernel.gru_cell(*leaves)
        out.square().sum().backward()
        return [out.detach()] + [leaf.grad for leaf in leaves]

    for one, three in zip(with_threads(1, run), with_threads(3, run)):
        assert torch.equal(one, three)


@needs_compiler
@pytest.mark.parametrize("length", [1, 6])
def test_gru_recurrence_and_its_gradients_match_float64(length):
    """The whole-sequence node (encoder) equals a float64 step loop: outputs and the gradients of gates_in, w_hh
    and b_hh, with the outputs' gradient given non-contiguous (as the encoder's concatenation gives it)."""
    generator = torch.Generator().manual_seed(5)
    batch, size = 7, 37
    gates_in = torch.randn(batch, length, 3 * size, generator=generator) * 2
    w_hh = torch.randn(3 * size, size, generator=generator) * 0.3
    b_hh = torch.randn(3 * size, generator=generator)
    grad = torch.randn(batch, length, 2 * size, generator=generator)[:, :, :size]  # non-contiguous
    results = []
    for dtype in (torch.float64, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (gates_in, w_hh, b_hh)]
        if dtype == torch.float64:
            h, outputs = torch.zeros(batch, size, dtype=dtype), []
            for t in range(length):
                h = gru_reference(leaves[0][:, t], torch.addmm(leaves[2], h, leaves[1].t()), h)
                outputs.append(h)
            out = torch.stack(outputs, 1)
        else:
            out = gru_kernel.gru_recurrence(*leaves)
        out.backward(grad.to(dtype))
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for expected, found in zip(*results):
        assert torch.allclose(found.double(), expected, atol=1e-5)


@needs_compiler
def test_gru_cell_refuses_shapes_and_types_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        gru_kernel.gru_cell(torch.zeros(2, 12), torch.zeros(2, 12), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="float32 CPU"):
        gru_kernel.gru_cell(torch.zeros(2, 12, dtype=torch.bfloat16), torch.zeros(2, 12), torch.zeros(2, 4))


# --- in a model ----------------------------------------------------------------------------------
@needs_compiler
@pytest.mark.parametrize("attention", ["luong_concat", "bahdanau"])
def test_a_model_trains_and_decodes_the_same_with_and_without_the_kernels(attention, monkeypatch):
    torch.manual_seed(5)
    model = Seq2Seq(tiny_model_config(attention=attention, input_feeding=True, dec_layers=2), 20, 20)
    batch, _, _ = random_batch(20, [5, 3, 8, 1], seed=6)
    runs = []
    for kernels in ("on", "off"):
        if kernels == "off":
            monkeypatch.setattr(gru_kernel.LIBRARY, "_loaded", {"functions": None})
            monkeypatch.setattr(loss_kernel.LIBRARY, "_loaded", {"functions": None})
        else:
            assert gru_kernel.LIBRARY.get() is not None and loss_kernel.LIBRARY.get() is not None
        model.zero_grad()
        loss = model(batch.src, batch.src_len, batch.tgt_in, tgt_out=batch.tgt_out, label_smoothing=0.1)
        loss.backward()
        with torch.no_grad():
            logits = model(batch.src, batch.src_len, batch.tgt_in)
        runs.append([loss.detach(), logits] + [p.grad.clone() for p in model.parameters()])
    for with_kernels, without in zip(*runs):
        assert torch.allclose(with_kernels, without, rtol=1e-4, atol=1e-5)


def test_without_the_kernels_the_loss_and_the_cell_are_atens(monkeypatch):
    monkeypatch.setattr(gru_kernel.LIBRARY, "_loaded", {"functions": None})
    monkeypatch.setattr(loss_kernel.LIBRARY, "_loaded", {"functions": None})
    assert not gru_kernel.usable(torch.zeros(1)) and not loss_kernel.usable(torch.zeros(1))
    torch.manual_seed(7)
    x, weight = torch.randn(6, 8, requires_grad=True), torch.randn(10, 8)
    target = torch.tensor([1, 4, 5, 0, 9, 2])
    from seq2seq.models.output_loss import linear_cross_entropy
    loss = linear_cross_entropy(x, weight, None, target)
    assert torch.allclose(loss, F.cross_entropy(x @ weight.t(), target, ignore_index=0, reduction="sum"))


@needs_compiler
def test_the_encoders_gru_is_the_same_with_and_without_the_kernel(monkeypatch):
    torch.manual_seed(8)
    model = Seq2Seq(tiny_model_config(enc_layers=2), 30, 30)
    src = torch.randint(1, 30, (5, 9))
    lengths = torch.tensor([9, 4, 7, 1, 3])
    src[torch.arange(9)[None, :] >= lengths[:, None]] = 0
    runs = []
    for kernel in ("on", "off"):
        if kernel == "off":
            monkeypatch.setattr(gru_kernel.LIBRARY, "_loaded", {"functions": None})
        model.zero_grad()
        out = model.encoder(src, lengths)
        (out.memory.square().sum() + out.final.sum()).backward()
        runs.append([out.memory.detach(), out.final.detach()] + [p.grad.clone() for p in model.encoder.parameters()
                                                                 if p.grad is not None])
    for with_kernel, without in zip(*runs):
        assert torch.allclose(with_kernel, without, atol=1e-5)
