"""The additive attention (scores v . tanh(q + k), masked softmax, context) as one C kernel on float32 CPU tensors.

ATen forms the [B, T, S, A] sum, its tanh and the product with v as separate passes over memory, saves
the tanh for the backward pass and takes the energy's gradient as a matrix product with an inner size of 1;
the softmax and the context's batched product follow as more passes, and in training the memory's gradient
is a batched outer product per step that ran at 1-5 GFLOP/s. The kernel (``csrc/additive_attention.c``) does
each direction in one pass that keeps every element in registers, recomputes the tanh in the backward pass
instead of saving it, and skips padding: less memory in training (no saved [B, S, A] tanh per step), faster
training and decoding (README, Speed and scale).

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``) for this CPU,
into ``$XDG_CACHE_HOME/seq2seq`` (``~/.cache/seq2seq``), and loaded with ctypes: no build step at install
and no compiler needed to run without it. Without a compiler, on other devices and types, and where
``SEQ2SEQ_ADDITIVE_KERNEL=0``, the attention takes its ATen path (the same results, within float rounding).
The kernel shares a batch's sentences out over torch's threads through OpenMP (``-fopenmp``; the library then
uses the OpenMP runtime torch has loaded, so its threads are torch's own, already awake after the step's
matrix products). A pool of Python threads had been no faster, probably because torch's OpenMP workers
spin for a while after each operation, on the cores those threads wanted. Where the compiler cannot build
with OpenMP the library is built without it and runs on the calling thread.
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

SOURCE = Path(__file__).parent / "csrc" / "additive_attention.c"
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
        self.forward = library.additive_attention_forward
        self.forward.argtypes = [_POINTER] * 7 + [_INT] * 6  # ..., B, T, S, A, H, threads
        self.forward.restype = None
        self.backward = library.additive_attention_backward
        self.backward.argtypes = [_POINTER] * 13 + [_INT] * 6
        self.backward.restype = None


_kernel: dict = {}  # "kernel" -> _Kernel or None: built (or found unbuildable) once per process
# True in a forked child, which runs the kernel on one thread: GNU OpenMP's threads are its parent's, not there,
# and a parallel region would wait for them for ever (torch's own parallel operations hang there too, so a
# forked worker should run torch on one thread, as DataLoader workers do)
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
    target = cache_dir / f"additive_attention-{key[:16]}.so"
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
                        log.warning("additive attention: the C kernel is not used (%s); ATen computes it",
                                    error)
                _kernel["kernel"] = loaded
    return _kernel["kernel"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: float32 on the CPU, outside torch.compile, and built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling() and kernel() is not None)


def _sizes(query: torch.Tensor, memory: torch.Tensor) -> tuple:
    """B, T, S, A, H and the threads to run them on (torch's count, one for small work)."""
    (batch, steps, size), (length, width) = query.shape, memory.shape[1:]
    threads = torch.get_num_threads() if batch * steps * length * size >= PARALLEL_ELEMENTS else 1
    if _forked["child"]:
        threads = 1
    return batch, steps, length, size, width, threads


def _forward(query, keys, v, memory, mask) -> tuple:
    """The forward pass on contiguous tensors (mask as uint8) -> (context, weights). The kernel reads raw
    memory, so the shapes are checked here rather than trusted."""
    (batch, steps, size), (length, width) = query.shape, memory.shape[1:]
    if (tuple(keys.shape), tuple(v.shape), tuple(mask.shape), memory.size(0)) != (
            (batch, length, size), (size,), (batch, length), batch):
        raise ValueError(f"additive attention: query {tuple(query.shape)}, keys {tuple(keys.shape)}, v "
                         f"{tuple(v.shape)}, memory {tuple(memory.shape)} and mask {tuple(mask.shape)} do not fit "
                         "[B, T, A], [B, S, A], [A], [B, S, H], [B, S]")
    weights, context = query.new_empty(batch, steps, length), query.new_empty(batch, steps, width)
    kernel().forward(*(t.data_ptr() for t in (query, keys, v, mask, memory, weights, context)),
                     *_sizes(query, memory))
    return context, weights


class AdditiveAttentionFunction(torch.autograd.Function):
    """query [B, T, A], keys [B, S, A], v [A], memory [B, S, H], mask [B, S] bool (True = real)
    -> context [B, T, H], weights [B, T, S] (0 at masked positions)."""

    @staticmethod
    def forward(ctx, query, keys, v, memory, mask):
        inputs = _contiguous(query, keys, v, memory, mask)
        context, weights = _forward(*inputs)
        ctx.save_for_backward(*inputs, weights)
        ctx.set_materialize_grads(False)
        return context, weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_context, grad_weights):
        query, keys, v, memory, mask, weights = ctx.saved_tensors
        grad_context = weights.new_zeros(weights.shape[:2] + memory.shape[2:]) if grad_context is None \
            else grad_context.contiguous()
        grad_weights = None if grad_weights is None else grad_weights.contiguous()
        grad_query, grad_keys, grad_memory = torch.empty_like(query), torch.empty_like(keys), torch.empty_like(memory)
        grad_scores = torch.empty_like(weights)  # the kernel's scratch
        grad_v_parts = v.new_empty(-(-query.size(0) // SENTENCES_PER_PART), v.size(0))  # [parts, A]
        pointers = [t.data_ptr() for t in (query, keys, v, mask, memory, weights, grad_context)]
        pointers += [None if grad_weights is None else grad_weights.data_ptr()]
        pointers += [t.data_ptr() for t in (grad_scores, grad_query, grad_keys, grad_v_parts, grad_memory)]
        kernel().backward(*pointers, *_sizes(query, memory))
        return grad_query, grad_keys, grad_v_parts.sum(0), grad_memory, None


def additive_attention(query: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, memory: torch.Tensor,
                       mask: torch.Tensor) -> tuple:
    """The kernel's (context [B, T, H], weights [B, T, S]); autograd through :class:`AdditiveAttentionFunction`
    where a gradient is needed."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, keys, v, memory)):
        return AdditiveAttentionFunction.apply(query, keys, v, memory, mask)
    return _forward(*_contiguous(query, keys, v, memory, mask))


def _contiguous(query, keys, v, memory, mask) -> tuple:
    """What the kernel reads: contiguous float tensors and the mask as uint8."""
    return (query.contiguous(), keys.contiguous(), v.contiguous(), memory.contiguous(),
            mask.contiguous().view(torch.uint8))
