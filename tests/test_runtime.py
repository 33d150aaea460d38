"""The CPU runtime set-up (seq2seq.runtime)."""
import subprocess
import sys

import pytest

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
    kept, faults_kept = page_faults("keep")
    _, faults_default = page_faults("default")
    if not kept:
        pytest.skip("not glibc")
    if faults_default < 10 * 2000:
        pytest.skip(f"this glibc reuses the blocks by default ({faults_default} page faults)")
    # kept: at most a heap growth or two over the ten steps (one 10 MiB tensor is 2,560 pages; a CI run saw
    # 2,500), where the default maps every step's tensors afresh (20,000 and more)
    assert faults_kept <= 2 * 2560
