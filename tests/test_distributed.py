"""DistributedDataParallel through torchrun: two CPU ranks on gloo keep identical weights at every step."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from seq2seq.checkpoint import load_bundle

ROOT = Path(__file__).resolve().parent.parent

RANK_SCRIPT = """
import os
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from seq2seq.train import train
from tests.conftest import tiny_config

run_dir = Path(sys.argv[1])

def check(model, progress):
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    same = all(torch.equal(everyone[0], other) for other in everyone[1:])
    with open(run_dir.parent / f"rank{dist.get_rank()}.log", "a") as f:
        f.write(f"{progress.step} {same}\\n")
    if progress.step == 6:
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(run_dir.parent / f"rank{dist.get_rank()}.safetensors"))

train(tiny_config(trainer=dict(max_steps=6, valid_every=3, batch_tokens=600)), run_dir, on_step=check)
# train() has left the process group: gloo's threads must be gone before the interpreter shuts down
tasks = Path("/proc/self/task")
names = [(task / "comm").read_text().strip() for task in tasks.iterdir()] if tasks.is_dir() else []
with open(run_dir.parent / f"rank{os.environ['RANK']}.threads", "w") as f:
    f.write(" ".join(sorted(name for name in names if "gloo" in name)) or "none")
"""


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_ranks_keep_identical_weights_and_rank0_saves_a_plain_model(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-12000:]
    for rank in (0, 1):
        lines = (tmp_path / f"rank{rank}.log").read_text().split()
        assert lines == [x for step in range(1, 7) for x in (str(step), "True")]
        assert (tmp_path / f"rank{rank}.threads").read_text() == "none"
    from safetensors.torch import load_file
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in saved)
    assert all(torch.equal(saved[k], rank1[k]) for k in rank1)
    load_bundle(tmp_path / "run" / "model")
    assert not list(tmp_path.glob("run/**/*rank1*"))  # only rank 0 writes into the run directory
