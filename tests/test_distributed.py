"""DistributedDataParallel through torchrun: two CPU ranks on gloo keep identical weights at every step, train
the model one process trains on the two ranks' batches merged, take every batch of an epoch once, and resume
on another number of ranks."""
import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import seq2seq.train
from seq2seq.checkpoint import load_bundle
from seq2seq.train import train
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent

# 23 batches in the first epoch: its twelfth round has a batch for rank 0 only
TRAINER = dict(max_steps=12, valid_every=3, batch_tokens=620)

RANK_SCRIPT = f"""
TRAINER = {TRAINER}
import os
import shutil
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from seq2seq.train import train
from tests.conftest import same_weights_on_every_rank, tiny_config

run_dir = Path(sys.argv[1])

def check(model, progress):
    same = same_weights_on_every_rank(model)
    with open(run_dir.parent / f"rank{{dist.get_rank()}}.log", "a") as f:
        f.write(f"{{progress.step}} {{same}}\\n")
    if progress.step == 10 and dist.get_rank() == 0:  # the checkpoint of step 9's validation
        shutil.copy(run_dir / "checkpoint.pt", run_dir.parent / "step9.pt")
    if progress.step == 12:
        weights = {{k: v.contiguous() for k, v in model.state_dict().items()}}
        save_file(weights, str(run_dir.parent / f"rank{{dist.get_rank()}}.safetensors"))

import json
import seq2seq.train

def recording(src_ids, tgt_ids):  # the training batches this rank takes, in order
    with open(run_dir.parent / f"batches{{dist.get_rank()}}.jsonl", "a") as f:
        f.write(json.dumps([list(s) for s in src_ids]) + "\\n")
    return made(src_ids, tgt_ids)

made, seq2seq.train.make_batch = seq2seq.train.make_batch, recording
train(tiny_config(trainer=TRAINER), run_dir, on_step=check)
# train() has left the process group: gloo's threads must be gone before the interpreter shuts down
tasks = Path("/proc/self/task")
names = [(task / "comm").read_text().strip() for task in tasks.iterdir()] if tasks.is_dir() else []
with open(run_dir.parent / f"rank{{os.environ['RANK']}}.threads", "w") as f:
    f.write(" ".join(sorted(name for name in names if "gloo" in name)) or "none")
"""


OOM_SCRIPT = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.train import train
from tests.conftest import same_weights_on_every_rank, tiny_config

run_dir = Path(sys.argv[1])
real_forward, calls = Seq2Seq.forward, []

def forward(self, *args, **kwargs):  # rank 1 runs out of GPU memory (simulated) in its second training batch
    if torch.is_grad_enabled() and dist.get_rank() == 1:
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    return real_forward(self, *args, **kwargs)

def check(model, progress):
    with open(run_dir.parent / f"rank{dist.get_rank()}.log", "a") as f:
        f.write(f"{progress.step} {progress.skipped_steps} {same_weights_on_every_rank(model)}\\n")

Seq2Seq.forward = forward
train(tiny_config(trainer=dict(max_steps=3, valid_every=3, batch_tokens=600)), run_dir, on_step=check)
"""

# dropout draws from each rank's own generator; steps as the second argument
DROPOUT_SCRIPT = """
import sys
from seq2seq.train import train
from tests.conftest import tiny_config

train(tiny_config(model=dict(dropout=0.3, emb_dropout=0.3),
                  trainer=dict(max_steps=int(sys.argv[2]), valid_every=3, batch_tokens=600)), sys.argv[1])
"""

ACCUMULATE_SCRIPT = """
import sys
from seq2seq.train import train
from tests.conftest import same_weights_on_every_rank, tiny_config

def check(model, progress):  # the same weights on both ranks after every step
    assert same_weights_on_every_rank(model), progress.step

train(tiny_config(trainer=dict(max_steps=6, valid_every=3, batch_tokens=620, accumulate=2)), sys.argv[1],
      on_step=check)
"""


# each rank in a directory of its own, as on machines that do not share the run directory
UNSHARED_SCRIPT = """
import os
import sys
from pathlib import Path
from seq2seq.train import train
from tests.conftest import tiny_config

work = Path(sys.argv[1]) / f"machine{os.environ['RANK']}"
work.mkdir(parents=True)
os.chdir(work)
train(tiny_config(trainer=dict(max_steps=int(sys.argv[2]), valid_every=3, batch_tokens=600)), "run")
"""


def run_two_ranks(script_text: str, tmp_path: Path, *args: str, succeed: bool = True) -> str:
    """torchrun with two CPU ranks on ``script_text``, given the run directory (tmp_path/run unless ``args``);
    returns its standard error, having checked that the run succeeded (or failed, with ``succeed`` False)."""
    script = tmp_path / "rank.py"
    script.write_text(script_text)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), *(args or [str(tmp_path / "run")])], cwd=ROOT, env=env,
                            capture_output=True, timeout=300)
    assert (result.returncode == 0) == succeed, result.stderr.decode()[-12000:]
    return result.stderr.decode()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_ranks_train_like_one_process_take_each_batch_once_and_resume_on_one(tmp_path, monkeypatch):
    """Identical weights on both ranks after every step; only rank 0 writes; the weights equal one process's on
    the ranks' batches merged; each batch of the epoch is taken once (the rank without a batch in the last
    round adds nothing); resumed by one process, the run goes on from the epoch's next batch."""
    run_two_ranks(RANK_SCRIPT, tmp_path)
    for rank in (0, 1):
        lines = (tmp_path / f"rank{rank}.log").read_text().split()
        assert lines == [x for step in range(1, 13) for x in (str(step), "True")]
        assert (tmp_path / f"rank{rank}.threads").read_text() == "none"
    from safetensors.torch import load_file
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in saved)
    assert all(torch.equal(saved[k], rank1[k]) for k in rank1)
    load_bundle(tmp_path / "run" / "model")
    assert not list(tmp_path.glob("run/**/*rank1*"))  # only rank 0 writes into the run directory

    # one process whose every step takes the two ranks' batches of that step as one batch: the same weights
    # (up to rounding), though the ranks' batches hold different numbers of target tokens
    def merged(batches, ctx):
        return [sum(batches[i: i + 2], []) for i in range(0, len(batches), 2)]

    monkeypatch.setattr(seq2seq.train, "shard", merged)
    train(tiny_config(trainer=TRAINER), tmp_path / "one")
    one = torch.load(tmp_path / "one" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    worst = max(((one[k] - rank0[k]).abs().max() / rank0[k].abs().max()).item() for k in rank0)
    assert worst < 1e-4, worst

    # the two ranks' run resumed by one process from step 9 goes on from the epoch's next batch
    monkeypatch.undo()
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.copy(tmp_path / "step9.pt", tmp_path / "resumed" / "checkpoint.pt")
    seen = {"token_batches": [], "encode_pairs": [], "make_batch": []}

    def spy(name, keep):
        real = getattr(seq2seq.train, name)

        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            seen[name].append(keep(args, result))
            return result
        monkeypatch.setattr(seq2seq.train, name, call)

    spy("token_batches", lambda args, result: result)  # the epoch's batches, as lists of sentence indices
    spy("encode_pairs", lambda args, result: result[0])  # the training sources the indices point to
    spy("make_batch", lambda args, result: [list(s) for s in args[0]])
    train(tiny_config(trainer=dict(TRAINER, max_steps=10)), tmp_path / "resumed")
    train_src = seen["encode_pairs"][0]
    epoch = [[list(train_src[i]) for i in group] for group in seen["token_batches"][0]]
    assert len(epoch) == 23
    taken = [[b for line in (tmp_path / f"batches{rank}.jsonl").read_text().splitlines()  # less validation's
              if (b := json.loads(line)) in epoch] for rank in (0, 1)]
    assert len(taken[0]) == 12 and len(taken[1]) == 11
    assert sorted(map(str, taken[0] + taken[1])) == sorted(map(str, epoch))  # each batch once
    assert sorted(map(str, taken[0][:9] + taken[1][:9])) == sorted(map(str, epoch[:18]))
    assert seen["make_batch"][0] == epoch[18]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_one_rank_out_of_memory_skips_the_batch_on_every_rank(tmp_path):
    """The GPU out-of-memory path, driven on the CPU by raising the same exception on rank 1 only: without
    telling rank 0, rank 0 would step alone (or wait for rank 1's gradients for ever)."""
    run_two_ranks(OOM_SCRIPT, tmp_path)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.log").read_text().split("\n")[:3] == ["1 0 True", "2 1 True", "3 1 True"]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["skipped_steps"] == 1


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_ranks_with_dropout_resume_exactly(tmp_path):
    """Stopped after three steps and resumed, two ranks reach an uninterrupted run's weights bit for bit: the
    checkpoint holds every rank's random state, not rank 0's alone."""
    run_two_ranks(DROPOUT_SCRIPT, tmp_path, str(tmp_path / "whole"), "6")
    run_two_ranks(DROPOUT_SCRIPT, tmp_path, str(tmp_path / "stopped"), "3")
    run_two_ranks(DROPOUT_SCRIPT, tmp_path, str(tmp_path / "stopped"), "6")
    whole, resumed = (torch.load(tmp_path / run / "checkpoint.pt", map_location="cpu", weights_only=True)
                      for run in ("whole", "stopped"))
    assert resumed["progress"]["step"] == whole["progress"]["step"] == 6
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_ranks_accumulating_two_batches_train_as_their_four_merged(tmp_path, monkeypatch):
    """trainer.accumulate=2 on two ranks: a step takes four of the epoch's 23 batches (the sixth three: rank 1
    has none in the last round), and equals one process's step on the four merged."""
    run_two_ranks(ACCUMULATE_SCRIPT, tmp_path)
    monkeypatch.setattr(seq2seq.train, "shard",
                        lambda batches, ctx: [sum(batches[i: i + 4], []) for i in range(0, len(batches), 4)])
    train(tiny_config(trainer=dict(max_steps=6, valid_every=3, batch_tokens=620)), tmp_path / "one")
    ranks, one = (torch.load(tmp_path / run / "checkpoint.pt", map_location="cpu", weights_only=True)
                  for run in ("run", "one"))
    assert ranks["progress"]["batch_in_epoch"] == 24
    worst = max(((a - one["model"][k]).abs().max() / a.abs().max()).item() for k, a in ranks["model"].items())
    assert worst < 1e-4, worst


MODEL_FILES = sorted((ROOT / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("options", [{}, dict(bridge="zeros"), dict(tie_embeddings=True), dict(input_feeding=False),
                                     dict(enc_layers=2, dec_layers=2), dict(attention="none")])
@pytest.mark.parametrize("model_file", MODEL_FILES, ids=[f.stem for f in MODEL_FILES])
def test_every_parameter_gets_a_gradient(model_file, options):
    """DistributedDataParallel (without find_unused_parameters) stops at the second step of a model with a
    parameter that takes no part in the loss: no model config may have one."""
    import yaml

    from seq2seq.batch import make_batch
    from seq2seq.models.seq2seq import Seq2Seq
    from seq2seq.step import training_loss

    values = {k: v for k, v in yaml.safe_load(model_file.read_text()).items() if k != "defaults"}
    sizes = dict(emb_size=16, enc_hidden_size=16, dec_hidden_size=16, attention_size=16)
    model = Seq2Seq(tiny_config(model={**values, **sizes, **options}).model, 30, 30).train()
    generator = torch.Generator().manual_seed(0)
    src = [torch.randint(4, 30, (n,), generator=generator).tolist() for n in (5, 7, 4)]
    tgt = [torch.randint(4, 30, (n,), generator=generator).tolist() for n in (6, 4, 5)]
    training_loss(model, make_batch(src, tgt)).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_ranks_wait_for_each_other_as_long_as_the_config_says(tmp_path, monkeypatch):
    """trainer.rank_timeout_minutes reaches the process group: rank 0's validation outlasts NCCL's default."""
    class Joined(Exception):
        pass

    def init_process_group(backend, **kwargs):
        raise Joined(backend, kwargs)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Joined) as joined:
        train(tiny_config(trainer=dict(max_steps=1, device="cpu", rank_timeout_minutes=90)), tmp_path / "run")
    assert joined.value.args == ("gloo", dict(timeout=timedelta(minutes=90)))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_ranks_that_do_not_share_the_run_directory_stop_with_an_error(tmp_path):
    """Rank 1 would train a tokenizer of its own (and start afresh when the others resume): both ranks stop."""
    errors = run_two_ranks(UNSHARED_SCRIPT, tmp_path, str(tmp_path), "3", succeed=False)
    assert errors.count("not every rank sees rank 0's run directory run") == 2
    assert not (tmp_path / "machine0" / "run" / "model").exists()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_ranks_that_do_not_see_the_checkpoint_to_resume_stop_with_an_error(tmp_path):
    """Rank 1 sees the tokenizer but not rank 0's checkpoint: it would start afresh while rank 0 resumed."""
    train(tiny_config(trainer=dict(max_steps=3, valid_every=3, batch_tokens=600)), tmp_path / "machine0" / "run")
    shutil.copytree(tmp_path / "machine0" / "run" / "tokenizer", tmp_path / "machine1" / "run" / "tokenizer")
    errors = run_two_ranks(UNSHARED_SCRIPT.replace("work.mkdir(parents=True)", ""), tmp_path, str(tmp_path), "6",
                           succeed=False)
    assert errors.count("not every rank sees rank 0's run directory run") == 2
    assert load_bundle(tmp_path / "machine0" / "run" / "model").config.trainer.max_steps == 3  # not trained on
