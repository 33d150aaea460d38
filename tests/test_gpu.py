"""CUDA paths: mixed precision, the device move, decoding equal to the CPU. Skipped without a GPU."""
import json

import pytest
import torch

from seq2seq.models import output_loss
from seq2seq.models.seq2seq import Seq2Seq, sequence_loss
from seq2seq.train import train
from seq2seq.translate import Translator
from tests.conftest import tiny_config, tiny_model_config
from tests.test_models import loss_and_gradients, random_batch
from tests.test_precision import assert_bf16_steps_close, decoding_steps_fp32_and_bf16

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision,compile", [("fp32", False), ("bf16", False), ("fp16", False), ("bf16", True)])
def test_training_on_cuda_with_each_precision(tmp_path, precision, compile):
    cfg = tiny_config(trainer=dict(device="cuda", precision=precision, compile=compile, max_steps=6, valid_every=3))
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 6
    history = [json.loads(line) for line in (tmp_path / "validations.jsonl").read_text().splitlines()]
    assert all(h["valid_loss"] == h["valid_loss"] for h in history)  # not NaN
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")  # the gradient scaler is saved for resume


def test_cuda_training_with_dropout_resumes_where_it_stopped(tmp_path):
    """The checkpoint holds the CUDA generator of the device in use (alone), so dropout after resuming draws
    the masks the uninterrupted run drew."""
    def config(steps):
        return tiny_config(model=dict(dropout=0.3, emb_dropout=0.3),
                           trainer=dict(device="cuda", max_steps=steps, valid_every=3))

    train(config(6), tmp_path / "whole")
    train(config(3), tmp_path / "stopped")
    train(config(6), tmp_path / "stopped")
    whole, resumed = (torch.load(tmp_path / run / "checkpoint.pt", map_location="cpu", weights_only=True)
                      for run in ("whole", "stopped"))
    assert len(resumed["rng_cuda"]) == 1
    worst = max(((a - resumed["model"][k]).abs().max() / a.abs().max().clamp_min(1e-12)).item()
                for k, a in whole["model"].items())
    assert worst < 1e-4, worst  # CUDA's atomic adds may round differently; other dropout masks differ far more


def test_cuda_decoding_matches_the_cpu(tmp_path):
    train(tiny_config(trainer=dict(device="cpu", max_steps=6, valid_every=6)), tmp_path)
    lines = ["The dog sees the cat.", "", "Two old men will buy a red car in the park."]
    cpu = Translator.from_dir(tmp_path / "model", device="cpu", beam_size=3).translate(lines)
    gpu = Translator.from_dir(tmp_path / "model", device="cuda", beam_size=3).translate(lines)
    assert [c[0].text for c in cpu] == [g[0].text for g in gpu]


@pytest.mark.parametrize("attention,feeding", [("bahdanau", True), ("bahdanau", False), ("luong_general", True)])
def test_compiled_step_on_cuda_equals_eager(attention, feeding):
    torch.manual_seed(0)
    model = Seq2Seq(tiny_model_config(attention=attention, input_feeding=feeding, dec_layers=2), 20, 20).cuda()
    batch = random_batch(20, [5, 3, 8, 6], seed=1)[0].to("cuda")
    eager = loss_and_gradients(model, batch)
    model.decoder.compile_step = True
    compiled = loss_and_gradients(model, batch)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_output_loss_on_cuda_equals_logits_and_cross_entropy():
    torch.manual_seed(2)
    model = Seq2Seq(tiny_model_config(attention="bahdanau"), 20, 20).cuda().eval()
    batch = random_batch(20, [5, 3, 8], seed=3)[0].to("cuda")
    plain = sequence_loss(model(batch.src, batch.src_len, batch.tgt_in), batch.tgt_out, 0.1)
    chunked = model(batch.src, batch.src_len, batch.tgt_in, tgt_out=batch.tgt_out, label_smoothing=0.1)
    assert torch.allclose(plain, chunked, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 8])  # None: the GPU's default (one chunk here)
@pytest.mark.parametrize("low_precision", [None, torch.bfloat16])
def test_chunked_output_loss_and_gradients_on_cuda(chunk_rows, low_precision, monkeypatch):
    """37 rows: in 8-row chunks the last is short (no padding rows on the GPU), weight gradients in groups of 2."""
    if chunk_rows:
        monkeypatch.setattr(output_loss, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(output_loss, "CHUNK_LOGITS", chunk_rows * 30 + 1)
        monkeypatch.setattr(output_loss, "LOW_PRECISION_GROUP_ROWS", 2 * chunk_rows)
    torch.manual_seed(6)
    x, weight, bias = torch.randn(37, 16), torch.randn(30, 16) * 0.3, torch.randn(30)
    target = torch.randint(0, 30, (37,))
    target[[3, 17]] = 0  # padding
    results = []
    for device, precision in (("cpu", None), ("cuda", low_precision)):
        leaves = [t.to(device).requires_grad_() for t in (x, weight, bias)]
        loss = output_loss.linear_cross_entropy(*leaves, target.to(device), 0.1, low_precision=precision)
        results.append([loss.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(loss * 0.5, leaves)])
    tolerance = 1e-4 if low_precision is None else 2e-2
    for exact, value in zip(*results):
        assert torch.allclose(value, exact, rtol=tolerance, atol=tolerance)


def test_bf16_decoding_steps_on_cuda_are_close_to_fp32():
    torch.manual_seed(4)
    model = Seq2Seq(tiny_model_config(attention="bahdanau", input_feeding=True, dec_layers=2), 40, 40).cuda().eval()
    batch = random_batch(40, [6, 3, 5], seed=5)[0].to("cuda")
    assert_bf16_steps_close(*decoding_steps_fp32_and_bf16(model, batch))
