"""Checkpoint averaging: one model whose weights are the mean of several saved during a training run.

Training keeps ``checkpoints/step-N.safetensors`` (the weights after the last and the best
validations) in its run directory. :func:`average_checkpoints` takes the last N by step or the best N
by validation BLEU (``validations.jsonl``), loads each into a model built from the run's ``model/``
directory (so tied weights are restored as the model shares them), averages the parameters and writes
a new self-contained model directory with the run's config and tokenizers.

``seq2seq-average --run RUN_DIR --output DIR [--n 5] [--which last|best]``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model

from seq2seq.checkpoint import ModelDirError, load_bundle, read_meta, save_bundle
from seq2seq.cli import USER_ERRORS, fail


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """step -> checkpoints/step-N.safetensors of a training run directory."""
    folder = run_dir / "checkpoints"
    if not run_dir.is_dir() or not folder.is_dir() or not (run_dir / "model").is_dir():
        raise ModelDirError(f"{run_dir}: not a training run directory (it needs model/ and checkpoints/; "
                            "checkpoints are kept when trainer.keep_checkpoints > 0)")
    steps = {}
    for path in folder.glob("step-*.safetensors"):
        number = path.stem.split("-", 1)[1]
        if number.isdigit():
            steps[int(number)] = path
    return steps


def validation_bleu(run_dir: Path) -> dict[int, float]:
    """step -> validation BLEU from the run's validations.jsonl (the last record of a step wins)."""
    path = run_dir / "validations.jsonl"
    if not path.is_file():
        raise ModelDirError(f"{path}: missing; --which best needs the run's validation records")
    scores = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            scores[int(record["step"])] = float(record["valid_bleu"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ModelDirError(f"{path}:{number}: not a validation record with step and valid_bleu") from None
    return scores


def pick_checkpoints(run_dir: str | Path, n: int, which: str = "last") -> list[tuple[int, Path]]:
    """The (step, path) of the last N checkpoints by step, or the best N by validation BLEU."""
    if which not in ("last", "best"):
        raise ValueError(f"which={which!r} must be 'last' or 'best'")
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    run_dir = Path(run_dir)
    steps = checkpoint_steps(run_dir)
    if which == "last":
        chosen = sorted(steps, reverse=True)[:n]
        available = len(steps)
    else:
        scores = validation_bleu(run_dir)
        scored = [s for s in steps if s in scores]
        chosen = sorted(scored, key=lambda s: (-scores[s], -s))[:n]
        available = len(scored)
    if available < n:
        raise ModelDirError(f"{run_dir / 'checkpoints'}: {n} checkpoints asked for but only {available} "
                            f"{'exist' if which == 'last' else 'have a validation record'}; ask for --n {available} "
                            "or fewer (training keeps trainer.keep_checkpoints of them)")
    return [(s, steps[s]) for s in sorted(chosen)]


def average_checkpoints(run_dir: str | Path, output_dir: str | Path, n: int = 5, which: str = "last") -> Path:
    """Average N checkpoints of a training run into a new model directory; returns its path."""
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    if output_dir.resolve() == (run_dir / "model").resolve():
        raise ModelDirError(f"{output_dir}: would replace the run's best model; choose another output directory")
    chosen = pick_checkpoints(run_dir, n, which)
    bundle = load_bundle(run_dir / "model")  # the architecture, config and tokenizers
    model = bundle.model
    total: dict[str, torch.Tensor] = {}
    for _, path in chosen:
        try:
            load_model(model, str(path), strict=True, device="cpu")
        except (SafetensorError, RuntimeError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelDirError(f"{path}: damaged or not from this run's model ({first[:200]})") from None
        for name, tensor in model.state_dict().items():  # tied weights appear under each name, same values
            total[name] = total[name] + tensor.double() if name in total else tensor.double()
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    model.load_state_dict({name: (t / len(chosen)).to(dtypes[name]) for name, t in total.items()})
    extra = {"averaged_steps": [s for s, _ in chosen], "averaged_which": which}
    return save_bundle(output_dir, model, bundle.config, bundle.src_tokenizer, bundle.tgt_tokenizer, extra=extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="seq2seq-average",
                                     description="Average the checkpoints of a training run into a model directory.")
    parser.add_argument("--run", required=True, help="training run directory (holds model/ and checkpoints/)")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--n", type=int, default=5, help="how many checkpoints to average (default 5)")
    parser.add_argument("--which", choices=("last", "best"), default="last",
                        help="the last N by step, or the best N by validation BLEU")
    args = parser.parse_args(argv)
    if args.n < 1:
        fail(f"--n must be at least 1, got {args.n}")
    try:
        output = average_checkpoints(args.run, args.output, args.n, args.which)
    except USER_ERRORS as err:
        fail(str(err))
    steps = read_meta(output)["averaged_steps"]
    print(f"averaged the checkpoints of steps {', '.join(map(str, steps))} into {output}")
