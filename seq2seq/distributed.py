"""Many processes through PyTorch's DistributedDataParallel, as launched by ``torchrun``.

``torchrun --nproc_per_node N scripts/train.py ...`` starts N processes with RANK / WORLD_SIZE set.
Each rank trains on its own shard of every epoch's batches; DDP averages the gradients, so the
weights stay identical on every rank, and each rank scales its loss so that the average is the gradient
of the summed loss over all ranks' target tokens: N ranks at ``trainer.batch_tokens=B`` train the
model one process would train on batches of N x B tokens (each step's N batches merged). Only rank 0
validates, logs and writes files; decisions that all ranks must share (stop early, stop for time, skip
a batch) are agreed on collectively.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_minutes: float) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun; one process per GPU on CUDA, gloo on CPU.

    ``timeout_minutes``: how long a rank waits in a collective before the run fails. The other ranks wait
    while rank 0 validates and saves, which on a large validation set outlasts NCCL's own default of 10
    minutes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), device
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # DistributedDataParallel imports torch._dynamo, and that import, made after the group exists,
        # keeps ten references to it (torch 2.13): destroy_process_group then leaves gloo's threads
        # running into interpreter shutdown, where one that drops a tensor aborts the process now and
        # then ("terminate called without an active exception"). Imported first, the group is freed.
        importlib.import_module("torch._dynamo")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return ctx, device


def shard(batches: list, ctx: DistContext) -> list:
    """This rank's batches, one per rank in each round: every rank gets as many, so the collective steps line
    up. Where the last round has fewer batches than ranks, the ranks left without one get None and take a
    step that adds nothing (``train_step``'s ``counted``), so that every batch is trained on once."""
    if not ctx.enabled:
        return batches
    rounds = -(-len(batches) // ctx.world_size)
    mine = batches[ctx.rank::ctx.world_size]
    return mine + [None] * (rounds - len(mine))


def broadcast(value: Any, ctx: DistContext) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_all(value: Any, ctx: DistContext) -> list:
    """Every rank's ``value``, in rank order, on every rank (``all_gather_object``: ``gather_object`` has
    not worked on NCCL in every torch version, and the values here are small)."""
    if not ctx.enabled:
        return [value]
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, value)
    return everyone


def sum_over_ranks(values: Sequence[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Each of ``values`` summed over the ranks, in one all-reduce (on one process: the values themselves)."""
    if not ctx.enabled:
        return [float(value) for value in values]
    tensor = torch.tensor([float(value) for value in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    return sum_over_ranks([flag], ctx, device)[0] > 0


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group; the caller has dropped its DistributedDataParallel wrapper, so the
    group is freed here and its threads joined while the interpreter is still whole."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
