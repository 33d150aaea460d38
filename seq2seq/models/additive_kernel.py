"""The additive attention's scores v . tanh(q + k) as one C kernel on float32 CPU tensors.

ATen forms the [B, T, S, A] sum, its tanh and the product with v as separate passes over memory, saves
the tanh for the backward pass and takes the energy's gradient as a matrix product with an inner size of 1.
The kernel (``csrc/additive_scores.c``) does each direction in one pass that keeps every element in
registers, recomputes the tanh in the backward pass instead of saving it, and skips padding: less memory in
training (no saved [B, S, A] tanh per step) and faster decoding (README, Speed and scale).

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``) for this CPU,
into ``$XDG_CACHE_HOME/seq2seq`` (``~/.cache/seq2seq``), and loaded with ctypes: no build step at install
and no compiler needed to run without it. Without a compiler, on other devices and types, and where
``SEQ2SEQ_ADDITIVE_KERNEL=0``, the attention takes its ATen path (the same scores, within float rounding).
The kernel shares a batch's sentences out over torch's threads through OpenMP (``-fopenmp``; the library then
uses the OpenMP runtime torch has loaded, so its threads are torch's own, already awake after the step's
matrix products): the training step's calls ran 1.9x as fast on two threads (README, Speed and scale). A
pool of Python threads had been no faster: torch's OpenMP workers spin after each product, on the cores
those threads wanted. Without OpenMP the library is built without it and runs on the calling thread.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "additive_scores.c"
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast",
         "-shared", "-fPIC"]
OPENMP_FLAGS = ["-fopenmp"]  # left out where the compiler cannot build with them (one thread then)
COMPILE_TIMEOUT_S = 120  # 0.2 s here: a compiler that hangs must not hang training
PARALLEL_ELEMENTS = 2**15  # fewer [B, T, S, A] elements than this run on one thread (~15 us of work)
SENTENCES_PER_PART = 8  # as in the C file: v's gradient comes in one part per this many sentences
_POINTER, _INT = ctypes.c_void_p, ctypes.c_int64


class _Kernel:
    """The loaded library's two functions."""

    def __init__(self, library: ctypes.CDLL):
        self.forward = library.additive_scores_forward
        self.forward.argtypes = [_POINTER] * 5 + [_INT] * 5  # ..., B, T, S, A, threads
        self.forward.restype = None
        self.backward = library.additive_scores_backward
        self.backward.argtypes = [_POINTER] * 8 + [_INT] * 5
        self.backward.restype = None


_kernel: dict = {}  # "kernel" -> _Kernel or None: built (or found unbuildable) once per process
# True in a forked child, which runs the kernel on one thread: GNU OpenMP's threads are its parent's, not there,
# and a parallel region would wait for them for ever
_forked = {"child": False}
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _forked.update(child=True))
_build_lock = threading.Lock()  # so that threads decoding side by side all see it built, or all not


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seq2seq"


def _cpu_identity() -> str:
    """What -march=native depends on, so that a cache shared between machines keeps one build per CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform
        return platform.processor() + platform.machine()
    return "".join(sorted({line for line in lines if line.startswith(("model name", "flags", "vendor_id"))}))


def build(cache_dir: Optional[Path] = None) -> Path:
    """Compile the kernel (or find it compiled) with OpenMP, else without, and return the shared library's path.
    Raises RuntimeError with the compiler's message when it cannot be built."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC to one)")
    cache_dir = cache_dir or _cache_dir()
    try:
        return _build(compiler, FLAGS + OPENMP_FLAGS, cache_dir)
    except _CompilerFailed:
        return _build(compiler, FLAGS, cache_dir)


class _CompilerFailed(RuntimeError):
    pass


def _build(compiler: str, flags: list, cache_dir: Path) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler] + flags).encode() + _cpu_identity().encode()).hexdigest()
    target = cache_dir / f"additive_scores-{key[:16]}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # built aside, then renamed: never half-written
        built = Path(tmp) / target.name
        try:
            result = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)], capture_output=True,
                                    text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{compiler} took over {COMPILE_TIMEOUT_S} s on {SOURCE}") from None
        if result.returncode != 0:
            raise _CompilerFailed(f"{compiler} failed on {SOURCE}: {result.stderr.strip()[:500]}")
        os.replace(built, target)
    return target


def kernel() -> Optional[_Kernel]:
    """The kernel, built on the first call; None where it is switched off or cannot be built (logged once)."""
    if "kernel" not in _kernel:
        with _build_lock:
            if "kernel" not in _kernel:
                loaded = None
                if os.environ.get("SEQ2SEQ_ADDITIVE_KERNEL", "1") != "0":
                    try:
                        loaded = _Kernel(ctypes.CDLL(str(build())))
                    except (OSError, RuntimeError) as error:
                        log.warning("additive attention: the C kernel is not used (%s); ATen computes the scores",
                                    error)
                _kernel["kernel"] = loaded
    return _kernel["kernel"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: float32 on the CPU, outside torch.compile, and built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling() and kernel() is not None)


def _sizes(query: torch.Tensor, keys: torch.Tensor) -> tuple:
    """B, T, S, A and the threads to run them on (torch's count, one for small work)."""
    sizes = (query.size(0), query.size(1), keys.size(1), keys.size(2))
    threads = torch.get_num_threads() if sizes[0] * sizes[1] * sizes[2] * sizes[3] >= PARALLEL_ELEMENTS else 1
    if _forked["child"]:
        threads = 1
    return (*sizes, threads)


def _scores(query, keys, v, mask) -> torch.Tensor:
    """The forward pass on contiguous tensors (mask as uint8). The kernel reads raw memory, so the shapes
    are checked here rather than trusted."""
    (batch, _, size), (key_batch, length, key_size) = query.shape, keys.shape
    if (key_batch, key_size, tuple(v.shape), tuple(mask.shape)) != (batch, size, (size,), (batch, length)):
        raise ValueError(f"additive scores: query {tuple(query.shape)}, keys {tuple(keys.shape)}, v "
                         f"{tuple(v.shape)} and mask {tuple(mask.shape)} do not fit [B, T, A], [B, S, A], [A], [B, S]")
    scores = query.new_empty(batch, query.size(1), length)
    kernel().forward(*(t.data_ptr() for t in (query, keys, v, mask, scores)), *_sizes(query, keys))
    return scores


class AdditiveScores(torch.autograd.Function):
    """query [B, T, A], keys [B, S, A], v [A], mask [B, S] bool (True = real) -> scores [B, T, S] (0 where
    masked: the caller masks them out)."""

    @staticmethod
    def forward(ctx, query, keys, v, mask):
        inputs = _contiguous(query, keys, v, mask)
        ctx.save_for_backward(*inputs)
        return _scores(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, keys, v, mask = ctx.saved_tensors
        grad = grad.contiguous()
        grad_query, grad_keys = torch.empty_like(query), torch.empty_like(keys)
        grad_v_parts = v.new_empty(-(-query.size(0) // SENTENCES_PER_PART), v.size(0))  # [parts, A]
        kernel().backward(*(t.data_ptr() for t in (query, keys, v, mask, grad, grad_query, grad_keys, grad_v_parts)),
                          *_sizes(query, keys))
        return grad_query, grad_keys, grad_v_parts.sum(0), None


def additive_scores(query: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kernel's scores (autograd through :class:`AdditiveScores` where a gradient is needed)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, keys, v)):
        return AdditiveScores.apply(query, keys, v, mask)
    return _scores(*_contiguous(query, keys, v, mask))


def _contiguous(query, keys, v, mask) -> tuple:
    """What the kernel reads: contiguous float tensors and the mask as uint8."""
    return query.contiguous(), keys.contiguous(), v.contiguous(), mask.contiguous().view(torch.uint8)
