"""Faults: NaN losses, SIGKILL at any point, interrupted saves."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seq2seq.step as step_module
from seq2seq.checkpoint import load_bundle, save_bundle
from seq2seq.train import TrainingError, train
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
TRAINER = dict(max_steps=14, valid_every=7, checkpoint_every=1, batch_tokens=1500)


def weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def nan_on(bad_calls, monkeypatch):
    """Make the training loss NaN on the given training calls (counted from 1; validation untouched)."""
    real, calls = step_module.training_loss, []

    def flaky(*args, **kwargs):
        loss = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # validation
            return loss
        calls.append(1)
        return loss * float("nan") if bad_calls(len(calls)) else loss

    monkeypatch.setattr(step_module, "training_loss", flaky)


def test_a_few_nan_batches_are_skipped_and_counted(tmp_path, monkeypatch):
    nan_on(lambda call: call in (3, 4), monkeypatch)
    summary = train(tiny_config(trainer=dict(max_steps=6, valid_every=6)), tmp_path)
    assert summary["steps"] == 6
    assert json.loads((tmp_path / "manifest.json").read_text())["skipped_steps"] == 2
    assert all(torch.isfinite(w).all() for w in weights(tmp_path).values())


def test_nan_in_a_row_stops_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    nan_on(lambda call: call > 4, monkeypatch)
    with pytest.raises(TrainingError, match=r"NaN/inf for 5 batches in a row at step 4; the last good checkpoint"):
        train(tiny_config(trainer=dict(max_steps=20, valid_every=2, max_bad_steps=5)), tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["progress"]["step"] == 4
    assert all(torch.isfinite(w).all() for w in state["model"].values())
    load_bundle(tmp_path / "model")  # the best model directory is whole


TRAIN_SCRIPT = """
import sys
from seq2seq.train import train
from tests.conftest import tiny_config
train(tiny_config(trainer={trainer!r}), sys.argv[1])
"""


def start_training(run_dir: Path, trainer: dict) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT.format(trainer=trainer), str(run_dir)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def checkpoint_step(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["progress"]["step"]
    except Exception:  # not written yet
        return -1


def test_sigkill_at_several_points_then_resume_gives_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    proc = start_training(straight, TRAINER)
    assert proc.wait(timeout=300) == 0
    expected = weights(straight)
    killed = tmp_path / "killed"
    kills = 0
    for kill_at_step in (2, 6, 11):  # kill -9 once the checkpoint has reached these steps
        proc = start_training(killed, TRAINER)
        deadline = time.monotonic() + 300
        while checkpoint_step(killed) < kill_at_step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2
    proc = start_training(killed, TRAINER)  # resumes automatically from the run directory
    assert proc.wait(timeout=300) == 0
    got = weights(killed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_an_interrupted_save_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    cfg = tiny_config()
    train(cfg, tmp_path / "run")
    bundle = load_bundle(tmp_path / "run" / "model")
    before = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped mid-write

    import seq2seq.checkpoint as checkpoint_module
    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(tmp_path / "run" / "model", bundle.model, cfg, bundle.src_tokenizer, bundle.tgt_tokenizer)
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []
    load_bundle(tmp_path / "run" / "model")


def test_same_seed_and_config_give_identical_weights(tmp_path):
    cfg = tiny_config(trainer=dict(max_steps=4, valid_every=4))
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["versions"]["torch"] == torch.__version__
    assert manifest["data"] == {"source": "builtin", "builtin_size": 300}


def test_out_of_memory_on_one_batch_skips_it(tmp_path, monkeypatch):
    """The GPU out-of-memory path, driven on the CPU by raising the same exception once."""
    from seq2seq.models.seq2seq import Seq2Seq

    real_forward, calls = Seq2Seq.forward, []

    def forward_once_oom(self, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(Seq2Seq, "forward", forward_once_oom)
    summary = train(tiny_config(trainer=dict(max_steps=4, valid_every=4)), tmp_path)
    assert summary["steps"] == 4 and len(calls) == 5
    assert json.loads((tmp_path / "manifest.json").read_text())["skipped_steps"] == 1
