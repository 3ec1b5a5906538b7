"""What a run records, resumes and reports: the trainer's per-epoch
bookkeeping (metric sums, the step counter, the schedule, time-based
checkpoints, metrics.csv), checkpoint tags and the commit a run records,
and the options the command line passes on."""
import copy
import json

import pytest
import torch

from conftest import TINY
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import config_from_dict
from pyro_vae.experiment import Experiment
from pyro_vae.rundir import RunDir
from pyro_vae.train import Progress, Trainer

def _tiny(**train):
    raw = copy.deepcopy(TINY)
    raw["train"].update({"limit": 300, "epochs": 2, **train})
    return config_from_dict(raw)


def _trainer(tmp_path, state=None, **train):
    (tmp_path / "run").mkdir(exist_ok=True)
    return Trainer(Experiment.build(_tiny(**train)), RunDir(tmp_path / "run"), state, progress=False, verbose=False)


def test_an_epochs_metric_sums_start_from_zero():
    """``finish_epoch`` resets the sums, so epoch 2's mean is its own batches' mean."""
    p = Progress()
    p.add({"loss": torch.tensor(2.0)}, 10)
    p.finish_epoch({"epoch": 1})
    p.add({"loss": torch.tensor(4.0)}, 5)
    assert p.means() == {"train_loss": 4.0}
    assert p.datapoints == 5 and p.epoch == 1


def test_a_mid_epoch_resume_restores_the_step_counter_and_progress(tmp_path):
    """Two steps, a checkpoint, a resume: the objective's step counter is 2
    (annealing schedules read it), and the epoch's datapoints and bad steps are restored."""
    trainer = _trainer(tmp_path)
    x = trainer.train_split.batch(slice(0, 100))
    trainer.step(x)
    trainer.step(x)
    trainer.state.bad_steps = 1
    trainer.checkpoint()
    resumed = _trainer(tmp_path, load_checkpoint(tmp_path / "run" / "checkpoint.pt"))
    assert resumed.objective.context.step == 2
    assert resumed.state.step_in_epoch == 2 and resumed.state.datapoints == 200
    assert resumed.state.bad_steps == 1
    assert resumed.scheduler.last_epoch == 2


def test_the_valid_elbo_is_the_valid_splits(tmp_path, monkeypatch):
    """The per-epoch valid ELBO reads the valid split, in order, every datapoint once."""
    import pyro_vae.train as train_module

    trainer = _trainer(tmp_path)
    seen = []

    def recording(model, guide, batches, *args, **kwargs):
        seen.extend(batches)
        return -1.0

    monkeypatch.setattr(train_module, "mean_elbo", recording)
    assert trainer._valid_elbo() == -1.0
    valid = trainer.experiment.data["valid"]
    assert torch.equal(torch.cat(seen), valid.batch(slice(None)))


def test_a_limit_of_the_whole_split_is_no_limit(tmp_path):
    """``evaluate_run`` with a limit == len(split) evaluates the whole split: limit None."""
    from pyro_vae.train import evaluate_run

    experiment = Experiment.build(_tiny())
    n = len(experiment.data["valid"])
    result = evaluate_run(experiment, "valid", 1, 1, 1000, n, progress=False)
    assert result.extra["limit"] is None


def test_a_checkpoint_every_checkpoint_minutes_inside_an_epoch_and_the_seconds_add_up(tmp_path, monkeypatch):
    """Train.checkpoint_minutes = 1 with clocks that move 30 s (monotonic) and 10 s
    (perf_counter) a step: checkpoints inside the 5-step epoch after steps 2 and 4 (60 s each),
    one at its end, and the epoch's seconds are the sum of its three parts, 50."""
    from types import SimpleNamespace

    import pyro_vae.train as train_module

    clock, perf = [1000.0], [0.0]
    monkeypatch.setattr(train_module, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=lambda: perf[0]))
    trainer = _trainer(tmp_path, epochs=1, checkpoint_minutes=1, limit=500)
    step, checkpoint, saved = trainer.step, trainer.checkpoint, []

    def timed_step(*args, **kwargs):
        clock[0] += 30.0
        perf[0] += 10.0
        return step(*args, **kwargs)

    def recorded_checkpoint():
        saved.append((trainer.state.epoch, trainer.state.step_in_epoch))
        checkpoint()

    trainer.step, trainer.checkpoint = timed_step, recorded_checkpoint
    history = trainer.fit()
    assert saved == [(0, 2), (0, 4), (1, 0)]
    assert history[0]["seconds"] == 50.0


def test_a_short_metrics_csv_is_rewritten_from_the_checkpoint(tmp_path):
    """A kill between the checkpoint and metrics.csv: the next call writes the rows of the
    checkpoint's history even when no epoch is left to train."""
    import csv

    from pyro_vae.train import fit

    run = RunDir(tmp_path / "run")
    fit(Experiment.build(_tiny(epochs=1)), run, progress=False, verbose=False)
    (tmp_path / "run" / "metrics.csv").unlink()
    history = fit(Experiment.build(_tiny(epochs=1)), run, progress=False, verbose=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1] and len(history) == 1


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # (no optimizer step yet)
def test_a_skipped_bad_step_still_advances_the_learning_rate_schedule(tmp_path):
    """The schedule counts every step, skipped or not, as the objective's step counter does."""
    trainer = _trainer(tmp_path, max_bad_steps=1, lr_schedule="cosine")
    x = trainer.train_split.batch(slice(0, 100))
    trainer.state.step_in_epoch = 1  # past the epoch's first (validated) step
    import pyro

    with pyro.validation_enabled(False):  # (the culprit search would stop at the NaN data otherwise)
        trainer.step(torch.full_like(x, float("nan")))
    assert trainer.state.bad_steps == 1 and trainer.state.datapoints == 0
    assert trainer.objective.context.step == 1 and trainer.scheduler.last_epoch == 1


def test_checkpoint_tags_name_the_epoch_inside_which_a_checkpoint_was_taken():
    """The end of epoch 10 is epoch10; step 120 inside epoch 3 (2 epochs finished) is epoch3_step120."""
    from pyro_vae.rundir import checkpoint_tag

    assert checkpoint_tag({"epoch": 10}) == "epoch10"
    assert checkpoint_tag({"epoch": 10, "step_in_epoch": 0}) == "epoch10"
    assert checkpoint_tag({"epoch": 2, "step_in_epoch": 120}) == "epoch3_step120"


def test_git_commit_marks_tracked_changes_dirty_and_ignores_untracked_files(tmp_path):
    """A clean checkout is HEAD's commit; an untracked file leaves it clean;
    a changed tracked file adds +dirty."""
    import re
    import subprocess

    from pyro_vae.provenance import git_commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "setup.cfg").write_text("[metadata]\n")
    git("add", "setup.cfg")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_commit(tmp_path) == head and re.fullmatch(r"[0-9a-f]{40}", head)
    (tmp_path / "notes.txt").write_text("untracked")
    assert git_commit(tmp_path) == head
    (tmp_path / "setup.cfg").write_text("[metadata]\nname = x\n")
    assert git_commit(tmp_path) == head + "+dirty"


class _Stop(Exception):
    pass


def test_ctrl_c_outside_the_trainer_exits_130(monkeypatch, capsys):
    """A KeyboardInterrupt that escapes a command exits 130, as a shell does."""
    from pyro_vae import registry
    from pyro_vae.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "load_catalogue", interrupted)
    assert main(["list"]) == 130
    assert "interrupted; the run directory holds the last checkpoint" in capsys.readouterr().err


def test_the_default_run_dir_is_runs_slash_the_config_stem(tmp_path, monkeypatch):
    """`pyro-vae train configs/tiny.toml` trains in runs/tiny."""
    from pathlib import Path

    import tomli_w

    import pyro_vae.train as train_module
    from pyro_vae.cli import main

    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(TINY))
    seen = {}

    def fake(config, run_dir, **kwargs):
        seen["run_dir"] = run_dir
        return {}

    monkeypatch.setattr(train_module, "train_and_evaluate", fake)
    assert main(["train", str(config), "--quiet"]) == 0
    assert Path(seen["run_dir"]) == Path("runs") / "tiny"


def test_evaluate_passes_its_options_to_the_evaluation(tmp_path, monkeypatch):
    """Each option given to ``pyro-vae evaluate`` reaches the evaluation; each one not given is the
    run's ``[eval]`` setting, except the limit: without ``--limit`` the whole split is evaluated."""
    import pyro_vae.train as train_module
    from pyro_vae.cli import main

    experiment = Experiment.build(_tiny())
    monkeypatch.setattr(RunDir, "load_trained", lambda self, device=None, from_previous=False: (experiment, {"epoch": 1}))
    seen = {}

    def fake(experiment, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(train_module, "evaluate_run", fake)
    with pytest.raises(_Stop):
        main(["evaluate", str(tmp_path), "--iw-samples", "7", "--split", "valid", "--limit", "9",
              "--chunk-size", "3", "--batch-size", "11", "--quiet"])
    assert (seen["num_samples"], seen["split"], seen["limit"], seen["chunk_size"], seen["batch_size"]) == \
        (7, "valid", 9, 3, 11)
    seen.clear()
    with pytest.raises(_Stop):
        main(["evaluate", str(tmp_path), "--quiet"])  # the config's eval section
    assert (seen["num_samples"], seen["split"], seen["limit"], seen["chunk_size"], seen["batch_size"]) == \
        (20, "test", None, 10, 50)  # the whole split: eval.limit (100) bounds only the evaluation after training


def test_sample_quality_with_iw_samples_runs_the_is_evaluation_too(tmp_path, monkeypatch):
    """--sample-quality alone scores samples only; with --iw-samples K the IS evaluation runs too."""
    import pyro_vae.cli as cli
    import pyro_vae.train as train_module

    experiment = Experiment.build(_tiny())
    monkeypatch.setattr(RunDir, "load_trained", lambda self, device=None, from_previous=False: (experiment, {"epoch": 1}))
    scored, seen = [], {}
    monkeypatch.setattr(cli, "_sample_quality", lambda run, experiment, n: scored.append(n))

    def fake(experiment, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(train_module, "evaluate_run", fake)
    assert cli.main(["evaluate", str(tmp_path), "--sample-quality", "--samples", "30", "--quiet"]) == 0
    assert scored == [30] and seen == {}
    with pytest.raises(_Stop):
        cli.main(["evaluate", str(tmp_path), "--sample-quality", "--samples", "30", "--iw-samples", "5", "--quiet"])
    assert scored == [30, 30] and seen["num_samples"] == 5
