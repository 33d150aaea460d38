"""The CPU runtime set-up (seq2seq.runtime)."""
import logging
import os
import subprocess
import sys

import pytest

from seq2seq.runtime import cpu_has_bf16_products

FAULTS = """
import resource, sys, torch
from seq2seq.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
x, w, b = torch.randn(320, 256).bfloat16(), torch.randn(256, 8000).bfloat16(), torch.randn(8000)
def decoding_step():  # the output layer of a bf16 beam-5 step: 5 and 10 MB tensors allocated and freed
    logits = torch.mm(x, w).float()
    logits += b
    return torch.log_softmax(logits, -1).view(320, 125, 64).amax(-1)
for _ in range(5):
    decoding_step()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    decoding_step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def page_faults(mode: str):
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_tensors_are_reused_without_page_faults():
    """By default glibc maps each 10 MiB tensor fresh from the system (2,560 page faults each time); kept,
    freed blocks are reused once warm."""
    if not cpu_has_bf16_products():  # ATen's bfloat16 product without the instructions: 24 s for the two runs
        pytest.skip("no bfloat16 instructions (on an AMD EPYC glibc reused these blocks by default: 0 page faults)")
    kept, faults_kept = page_faults("keep")
    _, faults_default = page_faults("default")
    if not kept:
        pytest.skip("not glibc")
    if faults_default < 10 * 2000:
        pytest.skip(f"this glibc reuses the blocks by default ({faults_default} page faults)")
    # kept: at most a heap growth or two over the ten steps (one 10 MiB tensor is 2,560 pages; a CI run saw
    # 2,500), where the default maps every step's tensors afresh (20,000 and more)
    assert faults_kept <= 2 * 2560


HEAPS = """
import ctypes, sys, threading, torch
from seq2seq.runtime import set_decoding_runtime
set_decoding_runtime(2, int(sys.argv[1]))
barrier = threading.Barrier(2)
def work():  # both threads allocate at once, so that glibc would give the second its own heap
    barrier.wait()
    for _ in range(50):
        torch.randn(256, 1024).sum()
threads = [threading.Thread(target=work) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.fflush(None)
if hasattr(libc, "malloc_stats"):  # glibc: to stderr, an "Arena N:" section per heap
    libc.malloc_stats()
"""


def heaps_used(workers: int) -> int:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    err = subprocess.run([sys.executable, "-c", HEAPS, str(workers)], capture_output=True, text=True, check=True,
                         env=env).stderr
    return err.count("Arena ")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_decoding_workers_share_one_heap():
    """With several workers, decoding threads allocate from glibc's one main heap (each heap keeps its freed
    blocks, and a heap per worker held a batch's worth more at the peak); one worker leaves glibc's default."""
    own = heaps_used(1)
    if own < 2:
        pytest.skip(f"this C library gave the threads {own} heap(s) by default")
    assert heaps_used(2) == 1


@pytest.mark.parametrize("precision,device,kept", [("fp32", "cpu", True), ("bf16", "cpu", False),
                                                    ("fp32", "cuda", False)])
def test_float32_training_on_the_cpu_keeps_freed_memory(monkeypatch, precision, device, kept):
    """Training keeps glibc's freed blocks in float32 on the CPU (faster there), not in bf16 (slower there)."""
    import torch

    from seq2seq import runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(runtime, "set_threads", lambda threads: calls.append(threads))
    assert runtime.set_training_runtime(3, precision, torch.device(device)) == kept
    assert calls == [3, True] if kept else calls == [3]


@pytest.mark.parametrize("has_bf16_units", [True, False])
def test_bf16_warns_once_set_where_the_cpu_has_no_bf16_units(monkeypatch, caplog, has_bf16_units):
    """trainer.precision=bf16 and translate --bf16 stay on (results are right) but say when they are slow here."""
    import torch

    from seq2seq import runtime
    from seq2seq.checkpoint import Bundle
    from seq2seq.models.seq2seq import Seq2Seq
    from seq2seq.step import use_precision
    from seq2seq.translate import Translator
    from tests.conftest import tiny_config

    monkeypatch.setattr(runtime, "cpu_has_bf16_products", lambda: has_bf16_units)
    model = Seq2Seq(tiny_config().model, 20, 20)
    with caplog.at_level(logging.WARNING, logger="seq2seq.runtime"):
        use_precision(model, "fp32", torch.device("cpu"))
        Translator(Bundle(model, tiny_config(), None, None), device="cpu")
        assert not caplog.text  # fp32 never warns
        use_precision(model, "bf16", torch.device("cpu"))
        Translator(Bundle(model, tiny_config(), None, None), device="cpu", bf16=True)
    warned = [record.getMessage() for record in caplog.records]
    assert model.decoder.bf16_products
    expected = [] if has_bf16_units else ["trainer.precision=bf16", "--bf16"]
    assert [message.split(": ")[0] for message in warned] == expected


def test_decoding_workers_share_out_the_threads():
    """Each decoding worker gets threads // workers torch threads (at least one); one worker gets them all."""
    import torch

    from seq2seq.runtime import set_decoding_runtime

    before = torch.get_num_threads()
    try:
        set_decoding_runtime(4, 2)
        assert torch.get_num_threads() == 2
        set_decoding_runtime(3, 4)
        assert torch.get_num_threads() == 1
        set_decoding_runtime(3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
