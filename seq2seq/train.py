"""The training loop: ``train(cfg, run_dir)`` needs no Hydra.

The run directory ends up holding
    model/              the best model by validation BLEU (a self-contained model directory)
    tokenizer/          the sentencepiece model(s), written before the first step
    checkpoint.pt       everything needed to resume exactly (tensors and plain values only)
    checkpoints/        step-N.safetensors weights after validations (the last and the best few), for averaging
    validations.jsonl   one line per validation
    summary.json        final figures, test BLEU included
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from seq2seq.batch import make_batch, token_batches
from seq2seq.checkpoint import Bundle, atomic_write_bytes, load_bundle, save_bundle
from seq2seq.config import Config, ConfigError
from seq2seq.data import DataError, filter_by_length, load_split
from seq2seq.distributed import (
    DistContext,
    any_rank,
    barrier,
    broadcast,
    gather_all,
    init_distributed,
    shard,
    shutdown,
    sum_over_ranks,
)
from seq2seq.manifest import build_manifest
from seq2seq.metrics import bleu, chrf
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.resume import Progress, keep_step_weights, load_checkpoint, random_states, save_checkpoint
from seq2seq.runtime import resolve_device, set_seed, set_training_runtime
from seq2seq.step import TrainingError, train_step, training_loss, use_precision
from seq2seq.tokenizer import Tokenizer, train_tokenizers
from seq2seq.translate import Translator

log = logging.getLogger(__name__)


# --- set-up ----------------------------------------------------------------------------------
def prepare_tokenizers(cfg: Config, train_pairs, run_dir: Path) -> tuple[Tokenizer, Tokenizer]:
    """Train sentencepiece on the training split, or reuse the run's own when resuming."""
    tok_dir = run_dir / "tokenizer"
    saved = saved_tokenizer_paths(run_dir)
    if saved:
        tokenizers = [Tokenizer.load(path) for path in saved]
        return tokenizers[0], tokenizers[-1]
    src_tok, tgt_tok = train_tokenizers(train_pairs, cfg.data.tokenizer)
    if src_tok is tgt_tok:
        atomic_write_bytes(tok_dir / "spm.model", src_tok.model_proto)
    else:
        atomic_write_bytes(tok_dir / "src.spm.model", src_tok.model_proto)
        atomic_write_bytes(tok_dir / "tgt.spm.model", tgt_tok.model_proto)
    return src_tok, tgt_tok


def saved_tokenizer_paths(run_dir: Path) -> list[Path]:
    """The run's saved tokenizer: [joint model] or [source model, target model]; [] where there is none."""
    tok_dir = run_dir / "tokenizer"
    for names in (["spm.model"], ["src.spm.model", "tgt.spm.model"]):
        if all((tok_dir / name).is_file() for name in names):
            return [tok_dir / name for name in names]
    return []


def check_shared_run_dir(run_dir: Path, resume_from: Optional[Path], ctx: DistContext, device: torch.device) -> None:
    """Under torchrun every rank reads rank 0's tokenizer, and its checkpoint ``resume_from`` when resuming, from
    the run directory: a rank that cannot see them would train a tokenizer of its own, or start afresh while the
    others resume. Every rank stops with the error instead (before the first collective of training)."""
    sees = bool(saved_tokenizer_paths(run_dir)) and (resume_from is None or resume_from.is_file())
    if ctx.enabled and any_rank(not sees, ctx, device):
        raise TrainingError(f"not every rank sees rank 0's run directory {run_dir}: under torchrun on several "
                            "machines, hydra.run.dir must be on a filesystem that all of them share")


def encode_pairs(pairs, src_tok: Tokenizer, tgt_tok: Tokenizer, max_len: int):
    src_ids = src_tok.encode([s for s, _ in pairs])
    tgt_ids = tgt_tok.encode([t for _, t in pairs])
    keep = filter_by_length(src_ids, tgt_ids, max_len)
    return [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]


def build_optimizer(model: torch.nn.Module, cfg: Config):
    t = cfg.trainer
    optimizer_class = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    parameters, settings = list(model.parameters()), dict(lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    try:  # one fused kernel per step: the same updates, 5x faster than the default on the CPU (31.8 -> 6.0 ms here)
        optimizer = optimizer_class(parameters, fused=True, **settings)
    except RuntimeError:  # a device without the fused kernel (or torch < 2.4 on the CPU)
        optimizer = optimizer_class(parameters, **settings)
    if t.scheduler == "warmup":
        def warmup_then_inverse_sqrt(step: int) -> float:
            step = max(step, 1)
            return min(step / t.warmup_steps, math.sqrt(t.warmup_steps / step)) if t.warmup_steps else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_inverse_sqrt)
    elif t.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=t.plateau_factor, patience=t.plateau_patience, min_lr=t.min_lr)
    else:
        scheduler = None
    return optimizer, scheduler


# --- validation --------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(model, src_ids, tgt_ids, batch_tokens: int, device) -> tuple[float, int]:
    model.eval()
    total, tokens = 0.0, 0
    for group in token_batches([len(s) for s in src_ids], [len(t) for t in tgt_ids], batch_tokens, 0, 0):
        batch = make_batch([src_ids[i] for i in group], [tgt_ids[i] for i in group]).to(device)
        total += training_loss(model, batch).item()
        tokens += batch.num_tgt_tokens
    return total, tokens


def translate_pairs(bundle: Bundle, pairs, device: str, batch_size: int) -> list[str]:
    search_cfg = replace(bundle.config.search, beam_size=1, batch_size=batch_size)
    translator = Translator(bundle, search_cfg, device=device)
    return [nbest[0].text for nbest in translator.translate([s for s, _ in pairs])]


# --- the loop ------------------------------------------------------------------------------------
def train(cfg: Config, run_dir: str | Path, on_step: Optional[Callable] = None) -> dict:
    """Train a model as ``cfg`` says; writes into ``run_dir`` and returns the summary.

    ``on_step(model, progress)``, when given, is called after every optimizer step. Under torchrun
    every rank calls this; rank 0's ``run_dir`` is used by all.
    """
    t = cfg.trainer
    ctx, device = init_distributed(resolve_device(t.device), t.rank_timeout_minutes)
    run_dir = Path(broadcast(str(run_dir), ctx))
    run_dir.mkdir(parents=True, exist_ok=True)
    if not ctx.is_main:
        log.setLevel(logging.WARNING)
    checkpoint_path = run_dir / "checkpoint.pt"
    resuming = broadcast(checkpoint_path.is_file(), ctx)  # rank 0's view (check_shared_run_dir checks the others')
    if t.resume and not resuming:
        raise TrainingError(f"trainer.resume=true but {checkpoint_path} does not exist; "
                            "point hydra.run.dir at the run to resume")
    if t.precision == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 needs a CUDA device; use bf16 (or fp32) on the CPU")
    set_training_runtime(t.threads, t.precision, device)
    set_seed(t.seed)

    train_pairs = load_split(cfg.data, cfg.data.train_split)
    valid_pairs = load_split(cfg.data, cfg.data.valid_split)
    if cfg.data.valid_max_sentences:
        valid_pairs = valid_pairs[: cfg.data.valid_max_sentences]
    # the other ranks read what rank 0 trained (or reloaded)
    tokenizers = prepare_tokenizers(cfg, train_pairs, run_dir) if ctx.is_main else None
    barrier(ctx)
    check_shared_run_dir(run_dir, checkpoint_path if resuming else None, ctx, device)
    src_tok, tgt_tok = tokenizers or prepare_tokenizers(cfg, train_pairs, run_dir)
    train_src, train_tgt = encode_pairs(train_pairs, src_tok, tgt_tok, cfg.data.max_len)
    if not train_src:
        raise DataError(f"no training pair is within data.max_len={cfg.data.max_len} pieces")
    valid_src, valid_tgt = encode_pairs(valid_pairs, src_tok, tgt_tok, 10**9)
    log.info("training pairs: %d kept of %d (max %d pieces); validation pairs: %d", len(train_src),
             len(train_pairs), cfg.data.max_len, len(valid_pairs))

    model = Seq2Seq(cfg.model, len(src_tok), len(tgt_tok)).to(device)
    if ctx.rank > 0:  # the same initial weights on every rank, but each its own dropout masks (as nanoGPT)
        set_seed(t.seed + ctx.rank)
    use_precision(model, t.precision, device)
    log.info("model: %s, %.2fM parameters", cfg.model.attention, sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    model.decoder.compile_step = t.compile
    progress = Progress()
    if resuming:
        progress = load_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, rank=ctx.rank)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint_path, progress.step,
                 progress.epoch, progress.batch_in_epoch)
    net = (DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if ctx.enabled
           else model)
    bundle = Bundle(model, cfg, src_tok, tgt_tok)
    manifest = build_manifest(cfg)
    if ctx.is_main:
        atomic_write_bytes(run_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
    src_lens, tgt_lens = [len(s) for s in train_src], [len(x) for x in train_tgt]
    start_time = time.monotonic() - progress.elapsed

    def out_of_budget() -> bool:
        out_of_time = bool(t.max_minutes and time.monotonic() - start_time >= t.max_minutes * 60)
        if t.max_minutes:  # clocks differ between ranks: stop when any rank's time is up
            out_of_time = any_rank(out_of_time, ctx, device)
        return bool((t.max_steps and progress.step >= t.max_steps)
                    or (t.max_epochs and progress.epoch >= t.max_epochs) or out_of_time)

    def validate() -> bool:
        """Rank 0 validates and saves; all ranks share its verdict. True when patience runs out."""
        other_ranks = gather_all(random_states(), ctx)[1:]  # for the checkpoint
        score, stop = validate_on_main(other_ranks) if ctx.is_main else (None, None)
        score, stop = broadcast((score, stop), ctx)
        if not ctx.is_main and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(score)
        return stop

    def validate_on_main(other_ranks: list) -> tuple[float, bool]:
        """Score the validation split, keep the best model, checkpoint."""
        loss, tokens = validation_loss(model, valid_src, valid_tgt, t.batch_tokens, device)
        hyps = translate_pairs(bundle, valid_pairs, str(device), cfg.search.batch_size)
        score = bleu(hyps, [r for _, r in valid_pairs])
        model.train()
        record = {"step": progress.step, "epoch": progress.epoch, "valid_loss": loss / max(tokens, 1),
                  "valid_ppl": math.exp(min(loss / max(tokens, 1), 50)), "valid_bleu": score.score,
                  "lr": optimizer.param_groups[0]["lr"], "elapsed_s": time.monotonic() - start_time}
        improved = score.score > progress.best_bleu
        if improved:
            progress.best_bleu, progress.best_step, progress.bad_validations = score.score, progress.step, 0
            save_bundle(run_dir / "model", model, cfg, src_tok, tgt_tok,
                        extra={"step": progress.step, "valid_bleu": round(score.score, 2)})
        else:
            progress.bad_validations += 1
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(score.score)
        progress.history.append(record)
        keep_step_weights(run_dir / "checkpoints", model, progress, t.keep_checkpoints)
        with open(run_dir / "validations.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(f"step {progress.step}: valid loss {record['valid_loss']:.3f} ppl {record['valid_ppl']:.2f} "
                   f"BLEU {score.score:.2f}{' (best)' if improved else ''}")
        progress.elapsed = time.monotonic() - start_time
        save_checkpoint(checkpoint_path, model, optimizer, scheduler, progress, scaler, other_ranks)
        return score.score, bool(t.patience and progress.bad_validations >= t.patience)

    model.train()
    total = t.max_steps or None
    # the bar is drawn on terminals only; elsewhere (logs, CI) the same figures go to the log
    bar = tqdm(total=total, initial=progress.step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=None if ctx.is_main else True)
    window_tokens, window_start, stop, bad_in_a_row = 0, time.monotonic(), False, 0
    while not stop and not out_of_budget():
        epoch_batches = token_batches(src_lens, tgt_lens, t.batch_tokens, t.seed, progress.epoch, t.batch_multiple)
        # the position counts the epoch's batches that all ranks have taken together, so that a run resumed on
        # another number of ranks goes on from there, neither repeating nor skipping a batch
        remaining = epoch_batches[progress.batch_in_epoch:]
        rounds, batch = shard(remaining, ctx), None
        for start in range(0, len(rounds), t.accumulate):  # a step takes t.accumulate rounds
            groups, micro_batches = rounds[start: start + t.accumulate], []
            for group in groups:
                # None: the epoch's last round has no batch for this rank, which runs its previous batch again
                # (or the epoch's next), counted zero
                if group is not None or batch is None:
                    chosen = remaining[0] if group is None else group
                    batch = make_batch([train_src[i] for i in chosen], [train_tgt[i] for i in chosen]).to(device)
                micro_batches.append(batch)
            counted = [group is not None for group in groups]
            step_tokens = sum(b.num_tgt_tokens for b, counts in zip(micro_batches, counted) if counts)
            progress.batch_in_epoch += ctx.world_size * len(groups)
            loss = train_step(net, micro_batches, optimizer, t, ctx, device, scaler, counted)
            if loss is None:  # skipped: not finite, or out of GPU memory
                bad_in_a_row += 1
                progress.skipped_steps += 1
                if bad_in_a_row >= t.max_bad_steps:
                    raise TrainingError(
                        f"the loss or gradient was NaN/inf for {bad_in_a_row} batches in a row at step "
                        f"{progress.step}; the last good checkpoint is {checkpoint_path}; lower trainer.lr or set "
                        "trainer.clip_grad_norm")
                continue
            bad_in_a_row = 0
            if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
            progress.step += 1
            if on_step is not None:
                on_step(model, progress)
            window_tokens += step_tokens
            bar.update(1)
            if progress.step % t.log_every == 0:
                window_tokens = sum_over_ranks([window_tokens], ctx, device)[0]  # tokens/s of all ranks together
                now = time.monotonic()
                figures = dict(loss=f"{loss / max(step_tokens, 1):.3f}", epoch=progress.epoch,
                               tok_s=f"{window_tokens / max(now - window_start, 1e-9):.0f}",
                               lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                bar.set_postfix(figures)
                if bar.disable and ctx.is_main:
                    log.info("step %d: %s", progress.step, " ".join(f"{k}={v}" for k, v in figures.items()))
                window_tokens, window_start = 0, now
            if progress.step % t.valid_every == 0:
                stop = validate()
            elif t.checkpoint_every and progress.step % t.checkpoint_every == 0:
                other_ranks = gather_all(random_states(), ctx)[1:]
                if ctx.is_main:
                    progress.elapsed = time.monotonic() - start_time
                    save_checkpoint(checkpoint_path, model, optimizer, scheduler, progress, scaler, other_ranks)
            if stop or out_of_budget():
                break
        else:
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    if broadcast(not progress.history or progress.history[-1]["step"] != progress.step, ctx):
        validate()
    summary = {"steps": progress.step, "epochs": progress.epoch, "best_valid_bleu": progress.best_bleu,
               "best_step": progress.best_step, "train_minutes": (time.monotonic() - start_time) / 60,
               "model_dir": str(run_dir / "model")}
    # the ranks leave the process group together, before rank 0 tests alone; the DDP wrapper holds the
    # group, so it goes first and leaving joins gloo's threads (see distributed.init_distributed)
    del net
    barrier(ctx)
    shutdown(ctx)
    if not ctx.is_main:
        return summary
    if t.test_after:
        summary.update(test_model(run_dir / "model", cfg, str(device), run_dir))
        manifest["test_bleu_signature"] = summary.get("test_bleu", {}).get("signature")
    manifest["skipped_steps"] = progress.skipped_steps
    atomic_write_bytes(run_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def test_model(model_dir: Path, cfg: Config, device: str, run_dir: Path) -> dict:
    """Translate the test split with the best model and score it."""
    try:
        test_pairs = load_split(cfg.data, cfg.data.test_split)
    except DataError as err:
        log.warning("no test split scored: %s", err)
        return {}
    bundle = load_bundle(model_dir)
    hyps = translate_pairs(bundle, test_pairs, device, cfg.search.batch_size)
    refs = [r for _, r in test_pairs]
    (run_dir / "test.hyp.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    test_bleu, test_chrf = bleu(hyps, refs), chrf(hyps, refs)
    print(f"test ({cfg.data.test_split}, greedy): {test_bleu.text}")
    print(f"test ({cfg.data.test_split}, greedy): {test_chrf.text}")
    return {"test_bleu": test_bleu.to_dict(), "test_chrf": test_chrf.to_dict()}
