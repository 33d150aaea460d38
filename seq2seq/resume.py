"""Training state for exact resume: ``checkpoint.pt`` and the kept step weights.

``checkpoint.pt`` holds only tensors and plain values (read with ``torch.load(weights_only=True)``):
model, optimiser, scheduler and gradient-scaler states, every random state, and the progress
counters, so a resumed run reaches the same weights as one that was never stopped.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from seq2seq.checkpoint import atomic_torch_save, save_weights


class ResumeError(RuntimeError):
    """A training checkpoint cannot be read back."""


@dataclass
class Progress:
    """Counters that a checkpoint carries so a resumed run continues exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained on, by all ranks together
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0  # validations since BLEU last improved
    elapsed: float = 0.0  # training seconds before this process started
    skipped_steps: int = 0  # batches skipped for a NaN/inf loss or running out of GPU memory
    history: list = field(default_factory=list)


def random_states() -> dict:
    """This process's random generators (torch's CPU and CUDA ones, Python's) as a checkpoint stores them.

    CUDA's: the current device's only, and only where CUDA is in use. Reading every device's
    (``get_rng_state_all``) made a CUDA context on every GPU, in every rank under torchrun, and on GPU 0 in
    a CPU run on a machine with GPUs.
    """
    return {"rng_torch": torch.get_rng_state(),
            "rng_cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
            "rng_python": json.dumps(random.getstate())}


def set_random_states(state: dict) -> None:
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():  # checkpoints before this held every device's, the
        torch.cuda.set_rng_state(state["rng_cuda"][0])  # first being device 0's, which one process trained on
    version, internal, gauss = json.loads(state["rng_python"])
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, model, optimizer, scheduler, progress: Progress, scaler=None,
                    other_ranks: Sequence[dict] = ()) -> None:
    """Written by rank 0; ``other_ranks`` holds the random states of ranks 1, 2, ... under torchrun (their
    dropout draws from their own generators, so a resumed run needs each rank's back)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "progress": {k: v for k, v in vars(progress).items() if k != "history"},
        "history": json.dumps(progress.history),
        **random_states(),
        "rng_other_ranks": list(other_ranks),
    }
    atomic_torch_save(state, path)


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None, rank: int = 0) -> Progress:
    """Restore a checkpoint into the given objects; ``rank`` takes that rank's random state (ranks past those
    that saved it, on resuming with more ranks, take rank 0's)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except Exception as err:  # a damaged file surfaces as many different torch errors
        raise ResumeError(f"{path}: cannot resume from this checkpoint ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    others = state.get("rng_other_ranks", [])
    set_random_states(others[rank - 1] if 0 < rank <= len(others) else state)
    return Progress(**state["progress"], history=json.loads(state["history"]))


def keep_step_weights(directory: Path, model, progress: Progress, keep: int) -> None:
    """Save this step's weights as checkpoints/step-N.safetensors; keep only the last and the best ``keep``."""
    if keep <= 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{progress.step}.safetensors"
    tmp = directory / f".{path.name}.tmp"
    save_weights(model, tmp)
    os.replace(tmp, path)
    last = [r["step"] for r in progress.history[-keep:]]
    best = [r["step"] for r in sorted(progress.history, key=lambda r: -r["valid_bleu"])[:keep]]
    for old in directory.glob("step-*.safetensors"):
        if int(old.stem.split("-")[1]) not in set(last) | set(best):
            old.unlink()
