"""Where and how computation runs: device choice, seeds, threads."""
from __future__ import annotations

import ctypes
import logging
import os
import random
import sys
from typing import Optional

import torch

log = logging.getLogger(__name__)


class DeviceError(ValueError):
    """The requested device is not available."""


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """trainer.precision -> the autocast type (None for fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def cpu_has_bf16_products() -> bool:
    """Whether oneDNN multiplies bfloat16 matrices with this CPU's own instructions (x86: AVX-512, fastest
    with AMX; Arm: BF16). Without them (an AVX2-only CPU such as AMD EPYC Zen 3) bfloat16 products take
    a fallback: 1-2 GFLOP/s against 68-83 in float32 on such a CPU (docs/speed.md)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def warn_if_slow_bf16(option: str) -> bool:
    """Log a warning naming ``option`` when bfloat16 products would run slower than float32 on this CPU.
    Returns whether it warned; the results stay correct either way."""
    if cpu_has_bf16_products():
        return False
    log.warning("%s: this CPU has no bfloat16 matrix instructions (AVX-512 or AMX), so bfloat16 products take "
                "a fallback tens of times slower than float32; use fp32 here", option)
    return True


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


DECODING_KERNEL_CACHE = 256  # oneDNN kernels kept while decoding (see set_threads)


def set_threads(threads: int, kernel_cache: int = 128) -> None:
    """Use ``threads`` CPU threads (0 = torch's default), flush denormal floats to zero, and bound
    oneDNN's cache of compiled matrix-product kernels.

    Near-zero softmax probabilities over a large vocabulary become denormal numbers, and x86 CPUs
    handle those in microcode: one output-layer backward pass ran 7x slower with them (seen here).
    oneDNN keeps a kernel (with its own copy of reordered weights) per matrix shape, up to 1,024 by
    default; batches of varying shape in bfloat16 grew training's peak memory to 2.52 GiB that way
    (Multi30k, 150 s). A kernel missing from the cache is rebuilt (15-40 ms for a product that takes
    3 ms): with batches of a multiple of 8 sentences (``trainer.batch_multiple``) and the loss in whole
    chunks, a cache of 64 trained 1.3x faster than one of 16 under autocast (60-step runs here). bf16
    training's decoder step pads its rows to a multiple of 32 (``decoder.ROW_MULTIPLE``): about ten row
    counts times twelve products, so the cache holds 128 (50 batches: 193 kernels built, against 631
    with 32; 45 MB more peak memory). Decoding with ``--bf16`` multiplies five weights by up
    to ten padded row counts (beam 5, batch 64), and there a cache of 32 ran 0.8x as fast as one of 256
    (test2016, beam 5), at the same peak memory: ``kernel_cache`` is the capacity (``DECODING_KERNEL_CACHE``
    for decoding). Call before the first matrix product; the environment variable, when set, wins.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(kernel_cache))
    if threads > 0:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX, MAX_MMAP_THRESHOLD = -1, -3, -8, 32 << 20
TRIM_THRESHOLD = 512 << 20


def _glibc_mallopt(environment_variable: str):
    """glibc's ``mallopt`` through ctypes, or None off Linux, under another C library, or where the user set
    ``environment_variable`` (the user's setting wins)."""
    if not sys.platform.startswith("linux") or environment_variable in os.environ:
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed blocks of up to 32 MiB instead of handing them back to the system.

    A decoding step allocates tensors of a few MiB (logits, their log-softmax) and frees them. By default
    glibc often maps such blocks fresh from the system, and each new tensor pays a page fault per 4 KiB
    page (62,000 faults over ten bf16 output-layer steps of beam 5, none with the blocks kept; tests).
    Decoding calls this (``set_decoding_runtime``): beam 5 on test2016 (bf16, batch 64) ran 413 and 399
    sent/s against 326 and 312, at the same peak memory (``scripts/benchmark.py``, runs alternated).
    Training calls it in float32 on the CPU (``set_training_runtime``). Memory freed at the top of the heap
    is returned beyond 512 MiB. Returns whether it applied (glibc only; the environment's
    MALLOC_MMAP_THRESHOLD_ wins where set).
    """
    mallopt = _glibc_mallopt("MALLOC_MMAP_THRESHOLD_")
    return (mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD))
            and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def share_one_heap() -> bool:
    """Have glibc's malloc serve every thread from its main heap rather than give threads heaps of their own.

    By default glibc gives a new thread a heap of its own (up to eight per core), and each heap keeps the blocks
    its thread freed (:func:`keep_freed_memory`), so two decoding workers each held a batch's worth of freed
    blocks: beam 5 over the whole vocabulary on test2016 (batch 64, 2 workers) peaked at 429-489 MiB that way,
    401-426 with one heap, at the same speed (340-387 and 350-382 sent/s; six runs each, alternated;
    docs/speed.md). A worker takes the heap's lock a few thousand times a second at most. Call before the
    threads start (glibc fixes the number of heaps once it makes its ninth); returns whether it applied (glibc
    only; the environment's MALLOC_ARENA_MAX wins).
    """
    mallopt = _glibc_mallopt("MALLOC_ARENA_MAX")
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


def set_training_runtime(threads: int, precision: str, device: torch.device) -> bool:
    """What training and the benchmark's training set up: ``threads`` (:func:`set_threads`) and, in float32
    on the CPU, glibc keeping freed memory (:func:`keep_freed_memory`; returns whether it applied).

    A float32 training step of the Multi30k model frees and allocates tensors of a few MiB (the loss's
    chunks, the step's activations and their gradients) and took 2,300-12,500 page faults per step by
    default, 0-550 with the blocks kept: a median 1.07x the tokens/s over twelve alternated pairs of runs
    (0.85x to 1.12x), peak memory 0.86-0.94 against 0.85-0.91 GiB (AMD EPYC, 2 threads, 40-60 steps).
    bf16 training on an Intel Xeon with AMX (eighth session) ran slower with them kept: 10,487 and 10,104
    target tokens/s against 11,111 and 10,589, so bf16 training leaves glibc as it is."""
    set_threads(threads)
    if device.type == "cpu" and precision == "fp32":
        return keep_freed_memory()
    return False


def set_decoding_runtime(threads: int, workers: int = 1) -> None:
    """What every decoding entry point (translate, tune, the benchmark's decoding) sets up: ``threads`` with
    decoding's kernel cache (:func:`set_threads`) and glibc keeping freed memory (:func:`keep_freed_memory`).
    With several ``workers`` (``Translator``'s decoding threads) the threads are shared out: each worker's
    products run on ``threads // workers`` of them (at least one; ``threads`` 0 = torch's default), and the
    workers share one heap (:func:`share_one_heap`)."""
    if workers > 1:
        threads = max(1, (threads or torch.get_num_threads()) // workers)
    set_threads(threads, DECODING_KERNEL_CACHE)
    keep_freed_memory()
    if workers > 1:
        share_one_heap()


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of the linear and GRU / LSTM layers, for CPU inference.

    Weights are stored in int8 and activations quantised on the fly; vanilla-RNN layers and
    embeddings stay in float32, and so does the additive attention's energy vector (A weights), so that its
    scores keep their C kernel (seq2seq/models/additive_kernel.py).
    """
    import warnings

    from torch.ao.quantization import default_dynamic_qconfig

    from seq2seq.models.attention import AdditiveAttention

    spec = {layer: default_dynamic_qconfig for layer in (torch.nn.Linear, torch.nn.GRU, torch.nn.LSTM)}
    spec.update({f"{name}.energy": None for name, module in model.named_modules()
                 if isinstance(module, AdditiveAttention)})
    with warnings.catch_warnings():  # torch marks the quantized tensor API as deprecated
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
