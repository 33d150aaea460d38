"""One optimizer step: the forward and backward passes over a step's micro-batches (on every rank under
torchrun), gradient clipping, the update. The loop around it is :mod:`seq2seq.train`."""
from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import torch

from seq2seq.batch import Batch
from seq2seq.distributed import DistContext, sum_over_ranks
from seq2seq.models.decoder import Decoder
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.runtime import autocast_dtype, warn_if_slow_bf16

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (for example: a resume was asked for but there is no checkpoint)."""


def training_loss(model, batch, teacher_forcing: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy of a batch's target tokens (a 0-dim float32 tensor)."""
    return model(batch.src, batch.src_len, batch.tgt_in, teacher_forcing=teacher_forcing, tgt_out=batch.tgt_out,
                 label_smoothing=label_smoothing)


def bf16_on_cpu(precision: str, device: torch.device) -> bool:
    return precision == "bf16" and device.type == "cpu"


def use_precision(model: Seq2Seq, precision: str, device: torch.device) -> None:
    """bf16 on the CPU runs the decoder's matrix products and output layer in bfloat16 and everything else
    in float32 (``Decoder.bf16_products``), not autocast: CPUs multiply bfloat16 matrices several times
    faster than float32 (AMX), but run its elementwise ops ~3x slower, and the encoder's fused RNN was slower
    in bfloat16. On CUDA bf16 and fp16 are autocast of the forward pass (``train_step``)."""
    model.decoder.bf16_products = bf16_on_cpu(precision, device)
    if model.decoder.bf16_products:
        warn_if_slow_bf16("trainer.precision=bf16")


def train_step(model, batches: Batch | Sequence[Batch], optimizer, t, ctx: DistContext = DistContext(), device=None,
               scaler: Optional[torch.amp.GradScaler] = None, counted: Optional[Sequence[bool]] = None) -> float | None:
    """Forward, backward, clip, update. Returns the summed loss, or None when the step was skipped.

    ``batches``: one batch, or the step's micro-batches (``trainer.accumulate``), whose gradients add up
    before the update: every loss is divided by the target tokens of all of them (on all ranks), so the
    step equals one over the micro-batches merged. ``model`` may be wrapped in DistributedDataParallel;
    then every rank skips a step together, and a micro-batch with ``counted`` False adds nothing (its
    tokens and gradients count zero), for a rank that has no batch of its own in an epoch's last round.
    ``trainer.precision`` bf16 / fp16 runs the forward pass under autocast (fp16 only on CUDA, with
    ``scaler``), except bf16 on the CPU: see :func:`use_precision`.
    """
    batches = [batches] if isinstance(batches, Batch) else list(batches)
    counted = [True] * len(batches) if counted is None else list(counted)
    device = device or batches[0].src.device
    amp_dtype = None if bf16_on_cpu(t.precision, device) else autocast_dtype(t.precision)
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(batch.num_tgt_tokens for batch, counts in zip(batches, counted) if counts)
    # micro-batches before the last take their backward pass before the step's agreement: they need the
    # tokens of all ranks first (one batch learns them in that agreement)
    all_tokens = sum_over_ranks([tokens], ctx, device)[0] if len(batches) > 1 else None
    total, bad = 0.0, False
    for i, (batch, counts) in enumerate(zip(batches, counted)):
        last = i == len(batches) - 1
        # DDP adds the ranks' gradients up in the last micro-batch's backward pass only
        with model.no_sync() if ctx.enabled and not last else contextlib.nullcontext():
            loss = None
            try:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = training_loss(model, batch, t.teacher_forcing, t.label_smoothing)
            except torch.cuda.OutOfMemoryError:  # the other ranks hear of it below and skip the step too
                log.warning("out of GPU memory on a batch of %d sentences (%d target tokens): skipped",
                            batch.src.size(0), batch.num_tgt_tokens)
                torch.cuda.empty_cache()
            if loss is not None and not torch.isfinite(loss).item():
                log.warning("skipping a batch whose loss is %s", loss.item())
                loss = None
            bad = bad or loss is None
            if last:
                # one all-reduce: whether any rank skips the step, and the tokens of all ranks' batches
                bad_ranks, step_tokens = sum_over_ranks([bad, tokens], ctx, device)
                all_tokens = all_tokens or step_tokens
                if bad_ranks > 0:
                    if not bad and ctx.is_main:
                        log.warning("skipping a batch: another rank ran out of memory or had a NaN/inf loss")
                    optimizer.zero_grad(set_to_none=True)
                    return None
            if bad:  # the step is skipped at its last micro-batch, on every rank together
                continue
            # DDP averages the ranks' gradients: dividing by the mean tokens per rank makes that average the
            # gradient of the loss summed over all ranks' tokens, divided by their total (one process: its own)
            scaled = (loss if counts else loss * 0.0) / (all_tokens / ctx.world_size)
            try:
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            except torch.cuda.OutOfMemoryError:
                if ctx.enabled and last:  # the other ranks wait in DDP's gradient all-reduce for this rank
                    raise TrainingError(f"rank {ctx.rank} ran out of GPU memory in the backward pass of a batch of "
                                        f"{batch.num_tgt_tokens} target tokens; lower trainer.batch_tokens and "
                                        "resume (trainer.resume=true) from the last checkpoint") from None
                log.warning("out of GPU memory in the backward pass of a batch of %d sentences (%d target tokens):"
                            " skipped", batch.src.size(0), batch.num_tgt_tokens)
                torch.cuda.empty_cache()
                bad = True
                if last:
                    optimizer.zero_grad(set_to_none=True)
                    return None
                continue
            total += loss.item() if counts else 0.0
    if scaler is not None:  # fp16: the scaler skips steps with inf gradients and lowers its scale
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm or float("inf"))
        scaler.step(optimizer)
        scaler.update()
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm or float("inf"))
        if not torch.isfinite(norm):
            log.warning("skipping a batch whose gradient norm is %s", norm.item())
            optimizer.zero_grad(set_to_none=True)
            return None
        optimizer.step()
    for module in model.modules():  # a fused optimizer step leaves the weights' versions as they were, so the
        if isinstance(module, Decoder):  # decoder's cast copies for decoding cannot tell that they are stale
            module.drop_cached_weights()
    return total
