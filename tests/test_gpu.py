"""CUDA paths: mixed precision, the device move, decoding equal to the CPU. Skipped without a GPU."""
import json

import pytest
import torch

from seq2seq.translate import Translator
from seq2seq.train import train
from tests.conftest import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_with_each_precision(tmp_path, precision):
    cfg = tiny_config(trainer=dict(device="cuda", precision=precision, max_steps=6, valid_every=3))
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 6
    history = [json.loads(line) for line in (tmp_path / "validations.jsonl").read_text().splitlines()]
    assert all(h["valid_loss"] == h["valid_loss"] for h in history)  # not NaN
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")  # the gradient scaler is saved for resume


def test_cuda_decoding_matches_the_cpu(tmp_path):
    train(tiny_config(trainer=dict(device="cpu", max_steps=6, valid_every=6)), tmp_path)
    lines = ["The dog sees the cat.", "", "Two old men will buy a red car in the park."]
    cpu = Translator.from_dir(tmp_path / "model", device="cpu", beam_size=3).translate(lines)
    gpu = Translator.from_dir(tmp_path / "model", device="cuda", beam_size=3).translate(lines)
    assert [c[0].text for c in cpu] == [g[0].text for g in gpu]
