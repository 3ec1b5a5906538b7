"""Data-parallel training through torchrun: 2 CPU processes (gloo) against one."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from conftest import TINY
from pyro_vae.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")

DUMP_EACH_RANK = """
import sys, torch
import pyro_vae.train as t
real_fit = t.Trainer.fit
def fit(self, tensorboard=False):
    history = real_fit(self, tensorboard)
    torch.save(self.objective.state_dict(), f"{out}/rank{{self.ranks.rank}}.pt")
    return history
t.Trainer.fit = fit
from pyro_vae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def config(tmp_path, objective):
    raw = {**TINY, "imports": ["deterministic"], "data": {"name": "mnist", "binarization": "threshold"},
           "objective": objective, "train": {**TINY["train"], "limit": 450, "epochs": 2, "batch_size": 100}}
    path = tmp_path / "ddp.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def run(argv, cwd, nproc=None):
    """``argv`` in one process, or under torchrun in ``nproc`` (each rank's
    output also in ``cwd/logs``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),  # this checkout's code
           "OMP_NUM_THREADS": "1"}
    if nproc:
        argv = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "--redirects=3", "--tee=3",
                f"--log-dir={cwd / 'logs'}", *argv]
    else:
        argv = [sys.executable, *argv]
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("size,world", [(5, 4), (10, 4), (3, 3), (7, 2), (2, 4)])
def test_the_ranks_shards_partition_a_global_batch_in_order(size, world):
    """Rank r trains on the r-th contiguous part of each global batch: the
    parts, in rank order, are the batch, and their sizes differ by at most 1
    (a batch smaller than the world leaves some ranks an empty part)."""
    from pyro_vae.distributed import Ranks

    index = torch.randperm(size)
    shards = [Ranks(rank=r, world_size=world).shard(index) for r in range(world)]
    assert torch.equal(torch.cat(shards), index)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_ranks_train_as_one_process_over_the_same_global_batches(tmp_path):
    cfg = config(tmp_path, {"name": "_reconstruction_at_the_mean"})
    script = tmp_path / "dump.py"
    script.write_text(DUMP_EACH_RANK.format(out=tmp_path))
    single = run([script, "train", cfg, "--run-dir", tmp_path / "single", "--no-eval", "--quiet"], tmp_path)
    assert single.returncode == 0, single.stderr
    (tmp_path / "rank0.pt").rename(tmp_path / "single.pt")
    ddp = run([script, "train", cfg, "--run-dir", tmp_path / "ddp", "--no-eval", "--quiet"], tmp_path, nproc=2)
    assert ddp.returncode == 0, ddp.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    one = torch.load(tmp_path / "single.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # the ranks stay identical
        assert torch.allclose(rank0[key], one[key], rtol=1e-4, atol=1e-5), key  # and equal to one process
    saved = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")  # rank 0 wrote the run
    assert saved["epoch"] == 2 and all(torch.equal(saved["model"][k], rank0["model." + k]) for k in saved["model"])
    rows = [(tmp_path / d / "metrics.csv").read_text().splitlines() for d in ("single", "ddp")]
    loss = [[float(line.split(",")[1]) for line in r[1:]] for r in rows]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)  # epoch means over both ranks' datapoints
    assert not (tmp_path / "ddp" / "eval_test_K20_first100_epoch2.json").exists()


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    cfg = config(tmp_path, {"name": "_reconstruction_at_the_mean", "nan_on_rank": 1, "nan_at_step": 2})
    pyro_vae = Path(sys.executable).parent / "pyro-vae"  # the console script, unchanged under torchrun
    ddp = run(["--no-python", pyro_vae, "train", cfg, "--run-dir", tmp_path / "ddp", "--quiet"], tmp_path, nproc=2)
    assert ddp.returncode != 0
    rank0 = next((tmp_path / "logs").rglob("0/stderr.log")).read_text()  # rank 0's loss was finite
    assert "pyro-vae: error: the loss or its gradient became NaN or infinite" in rank0 and "at epoch 1, step 3" in rank0


def test_the_backend_follows_the_training_device_not_the_machine(monkeypatch):
    """gloo for a run on the CPUs, also where GPUs are present; NCCL on this
    rank's GPU (``LOCAL_RANK``) for a CUDA run; more ranks on a node than
    GPUs is refused, naming the fix."""
    import torch.distributed as dist

    from pyro_vae.distributed import init_ranks
    from pyro_vae.errors import ConfigError

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", calls.append)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    ranks = init_ranks(torch.device("cpu"))
    assert calls == ["gloo"] and (ranks.rank, ranks.world_size) == (1, 2)
    calls.clear()
    init_ranks(torch.device("cuda"))
    assert calls == [1, "nccl"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"it has 1 CUDA device\(s\) and NCCL needs one per process: start torchrun "
                                          r"with --nproc_per_node 1 or fewer, or train on the CPUs"):
        init_ranks(torch.device("cuda"))
