"""Small C kernels for float32 CPU tensors (``csrc/*.c``): compiled on first use, loaded with ctypes.

Each C file is compiled with the system's C compiler (``$CC``, else ``cc``) for this CPU (``-O3 -march=native``)
into ``$XDG_CACHE_HOME/seq2seq`` (``~/.cache/seq2seq``), once per source (with the headers beside it), compiler
and CPU, built aside and renamed so that a library is never half-written: no build step at install, and no
compiler needed to run without them. Without a compiler, or where a kernel's switch (``SEQ2SEQ_..._KERNEL=0``)
is set, the callers take their ATen path (the same results, within float rounding), after one warning.

The kernels share their work out over torch's threads through OpenMP (``-fopenmp``): the library then uses
the OpenMP runtime torch has loaded, so its threads are torch's own, already awake after the step's matrix
products. Where the compiler cannot build with OpenMP the library is built without it and runs on the calling
thread; so does a forked child (GNU OpenMP's threads are its parent's, not there, and a parallel region would
wait for them for ever; torch's own parallel operations hang there too, so a forked worker should run torch
on one thread, as DataLoader workers do).
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
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast",
         "-shared", "-fPIC"]
OPENMP_FLAGS = ["-fopenmp"]  # left out where the compiler cannot build with them (one thread then)
COMPILE_TIMEOUT_S = 120  # 0.2 s here: a compiler that hangs must not hang training
POINTER, INT, FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

_forked = {"child": False}  # set in a forked child, which runs every kernel on one thread
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _forked.update(child=True))


def threads_for(elements: int, parallel_elements: int) -> int:
    """torch's thread count for work of at least ``parallel_elements`` elements, else 1 (and 1 in a forked
    child): waking threads costs more than small work."""
    return torch.get_num_threads() if elements >= parallel_elements and not _forked["child"] else 1


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seq2seq"


def _cpu_identity() -> str:
    """What -march=native depends on, so that a cache shared between machines keeps one build per CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform
        return platform.processor() + platform.machine()
    return "".join(sorted({line for line in lines if line.startswith(("model name", "flags", "vendor_id"))}))


class _CompilerFailed(RuntimeError):
    pass


def build(source: Path, directory: Optional[Path] = None) -> Path:
    """Compile ``source`` (or find it compiled) with OpenMP, else without, and return the shared library's path.
    Raises RuntimeError with the compiler's message when it cannot be built."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC to one)")
    directory = directory or cache_dir()
    try:
        return _build(compiler, FLAGS + OPENMP_FLAGS, source, directory)
    except _CompilerFailed:
        return _build(compiler, FLAGS, source, directory)


def _build(compiler: str, flags: list, source: Path, directory: Path) -> Path:
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # includes
    key = hashlib.sha256(text + " ".join([compiler] + flags).encode() + _cpu_identity().encode()).hexdigest()
    target = directory / f"{source.stem}-{key[:16]}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # built aside, then renamed: never half-written
        built = Path(tmp) / target.name
        try:
            result = subprocess.run([compiler, *flags, "-o", str(built), str(source)], capture_output=True,
                                    text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{compiler} took over {COMPILE_TIMEOUT_S} s on {source}") from None
        if result.returncode != 0:
            raise _CompilerFailed(f"{compiler} failed on {source}: {result.stderr.strip()[:500]}")
        os.replace(built, target)
    return target


class Library:
    """One C file's functions, built and loaded on the first ``get()``: ``declare(cdll)`` sets their argument
    types and returns them; ``switch`` names the environment variable that turns them off (``=0``)."""

    def __init__(self, source: str, switch: str, what: str, declare: Callable[[ctypes.CDLL], object]):
        self.source, self.switch, self.what, self.declare = CSRC / source, switch, what, declare
        self._loaded: dict = {}  # "functions" -> declared functions or None: built (or found unbuildable) once
        self._lock = threading.Lock()  # so that threads decoding side by side all see it built, or all not

    def build(self, directory: Optional[Path] = None) -> Path:
        return build(self.source, directory)

    def get(self):
        """The declared functions, built on the first call; None where switched off or unbuildable (logged once)."""
        if "functions" not in self._loaded:
            with self._lock:
                if "functions" not in self._loaded:
                    loaded = None
                    if os.environ.get(self.switch, "1") != "0":
                        try:
                            loaded = self.declare(ctypes.CDLL(str(self.build())))
                        except (OSError, RuntimeError) as error:
                            log.warning("%s: the C kernel is not used (%s); ATen computes it", self.what, error)
                    self._loaded["functions"] = loaded
        return self._loaded["functions"]

    def forget(self) -> None:
        """Build or look again at the next ``get()`` (tests switch kernels on and off)."""
        with self._lock:
            self._loaded.clear()

    def usable(self, *tensors: torch.Tensor) -> bool:
        """Whether these tensors can go to the kernel: float32 on the CPU, outside torch.compile, and built."""
        return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
                and not torch.compiler.is_compiling() and self.get() is not None)


def declare(function, argtypes: list):
    """Set a C function's argument types (it returns nothing) and return it."""
    function.argtypes, function.restype = argtypes, None
    return function
