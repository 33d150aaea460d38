"""The training loop: it learns, keeps the best model, and a resumed run equals an uninterrupted one."""
import json

import pytest
import torch

import seq2seq.train
from seq2seq.checkpoint import load_bundle
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.train import TrainingError, build_optimizer, train
from tests.conftest import tiny_config


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    trainer = dict(max_steps=12, valid_every=5, batch_tokens=1500)
    summary = train(tiny_config(trainer=trainer), tmp_path / "straight")
    assert summary["steps"] == 12 and summary["epochs"] >= 1  # crosses an epoch boundary
    train(tiny_config(trainer=dict(trainer, max_steps=5)), tmp_path / "stopped")
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["steps"] == 5
    resumed = train(tiny_config(trainer=dict(trainer, resume=True)), tmp_path / "stopped")
    assert resumed["steps"] == 12
    straight, stopped = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert straight.keys() == stopped.keys()
    for name in straight:
        assert torch.equal(straight[name], stopped[name]), name


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="trainer.resume=true but .*checkpoint.pt does not exist"):
        train(tiny_config(trainer=dict(resume=True)), tmp_path)


def test_training_lowers_the_loss_and_writes_a_model_directory(tmp_path):
    cfg = tiny_config(trainer=dict(max_steps=30, valid_every=10, test_after=True))
    summary = train(cfg, tmp_path)
    history = [json.loads(line) for line in (tmp_path / "validations.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [10, 20, 30]
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]
    assert "BLEU" in summary["test_bleu"]["signature"] or "nrefs" in summary["test_bleu"]["signature"]
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-10.safetensors", "step-20.safetensors", "step-30.safetensors"]
    bundle = load_bundle(tmp_path / "model")
    assert bundle.config == cfg
    assert len((tmp_path / "test.hyp.txt").read_text().splitlines()) == 500


def test_only_the_last_and_best_checkpoints_are_kept(tmp_path):
    train(tiny_config(trainer=dict(max_steps=12, valid_every=2, keep_checkpoints=2)), tmp_path)
    history = [json.loads(line) for line in (tmp_path / "validations.jsonl").read_text().splitlines()]
    best = {r["step"] for r in sorted(history, key=lambda r: -r["valid_bleu"])[:2]}
    expected = {f"step-{s}.safetensors" for s in best | {10, 12}}
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == expected


def test_bf16_precision_trains_on_the_cpu_and_fp16_is_refused(tmp_path):
    flags = []  # on the CPU the decoder's products run in bfloat16, not under autocast (train.use_precision)
    summary = train(tiny_config(trainer=dict(precision="bf16", max_steps=4, valid_every=4)), tmp_path / "bf16",
                    on_step=lambda model, progress: flags.append(model.decoder.bf16_products))
    assert summary["steps"] == 4 and flags == [True] * 4
    history = [json.loads(line) for line in (tmp_path / "bf16" / "validations.jsonl").read_text().splitlines()]
    assert history[-1]["valid_loss"] < 10
    from seq2seq.config import ConfigError
    with pytest.raises(ConfigError, match="trainer.precision=fp16 needs a CUDA device"):
        train(tiny_config(trainer=dict(precision="fp16")), tmp_path / "fp16")


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_the_fused_optimizer_makes_the_same_updates(name):
    cfg = tiny_config(trainer=dict(optimizer=name, weight_decay=0.01))
    models = [Seq2Seq(cfg.model, 30, 30) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused, _ = build_optimizer(models[0], cfg)
    assert fused.defaults["fused"]  # torch 2.13 has the fused kernel on the CPU
    plain_class = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    plain = plain_class(models[1].parameters(), lr=cfg.trainer.lr, betas=tuple(cfg.trainer.betas), weight_decay=0.01)
    for step in range(3):
        for model in models:
            for i, p in enumerate(model.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 100 + i))
        fused.step()
        plain.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_validation_sees_the_weights_after_a_fused_optimizer_step():
    """A fused Adam step updates the weights without changing their versions: validation must not score
    the bfloat16 copies cast before it."""
    from seq2seq.batch import make_batch
    from seq2seq.step import train_step, use_precision
    from seq2seq.train import validation_loss

    cfg = tiny_config(trainer=dict(precision="bf16", lr=0.05))
    torch.manual_seed(5)
    model = Seq2Seq(cfg.model, 30, 30)
    use_precision(model, "bf16", torch.device("cpu"))
    generator = torch.Generator().manual_seed(5)
    src = [torch.randint(4, 30, (n,), generator=generator).tolist() for n in (5, 7, 4, 6)]
    tgt = [torch.randint(4, 30, (n,), generator=generator).tolist() for n in (6, 4, 5, 7)]
    optimizer, _ = build_optimizer(model, cfg)
    for _ in range(2):
        validation_loss(model, src, tgt, 1000, torch.device("cpu"))  # casts the weights for decoding
        model.train()
        train_step(model, make_batch(src, tgt), optimizer, cfg.trainer)
    half, _ = validation_loss(model, src, tgt, 1000, torch.device("cpu"))
    model.decoder.bf16_products = False
    full, _ = validation_loss(model, src, tgt, 1000, torch.device("cpu"))
    assert half != full and abs(half - full) < 0.02 * full


def merge_pairs(batches, ctx):
    """In place of ``shard``: each two consecutive batches of the epoch as one."""
    return [sum(batches[i: i + 2], []) for i in range(0, len(batches), 2)]


def test_accumulated_batches_train_as_the_batches_merged(tmp_path, monkeypatch):
    """trainer.accumulate=2 adds two batches' gradients before a step, each loss divided by the tokens of both:
    the weights of a step on the two merged (to rounding). 23 batches an epoch: the twelfth step has one."""
    trainer = dict(max_steps=12, valid_every=6, batch_tokens=620)
    train(tiny_config(trainer=dict(trainer, accumulate=2)), tmp_path / "accumulated")
    monkeypatch.setattr(seq2seq.train, "shard", merge_pairs)
    train(tiny_config(trainer=trainer), tmp_path / "merged")
    accumulated, merged = (torch.load(tmp_path / run / "checkpoint.pt", map_location="cpu", weights_only=True)
                           for run in ("accumulated", "merged"))
    assert accumulated["progress"]["batch_in_epoch"] == 23 and accumulated["progress"]["epoch"] == 0
    worst = max(((a - merged["model"][k]).abs().max() / a.abs().max()).item()
                for k, a in accumulated["model"].items())
    assert worst < 1e-4, worst
