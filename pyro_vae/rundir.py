"""The run directory: one experiment's config, checkpoints, metrics, pictures
and evaluations.

::

    RUN_DIR/config.toml          the resolved config of the latest `train` (every default filled in)
    RUN_DIR/sessions.jsonl       one line per `train` call: settings, what changed, versions, git commit
    RUN_DIR/checkpoint.pt        model, guide, objective state, optimizer, RNG states, step, history
    RUN_DIR/checkpoint.prev.pt   the checkpoint before it
    RUN_DIR/metrics.csv          per epoch: train_loss, train_elbo, the objective's metrics, valid_elbo, lr, seconds
    RUN_DIR/tensorboard/         the same as TensorBoard event files (when TensorBoard is installed)
    RUN_DIR/samples.png          64 samples from the prior
    RUN_DIR/reconstructions.png  test digits (left of each pair) beside their reconstructions (right)
    RUN_DIR/curves.png           ELBO per epoch
    RUN_DIR/report.json          training summary, the latest evaluation, and every evaluation so far
    RUN_DIR/eval_<split>_K<K>[_first<N>]_epoch<E>[_step<S>].json   one evaluation (+ per-datapoint .npz)

Every file is written to a temporary name and renamed into place: an
interrupted write never leaves half a file, and a symbolic link planted in
the directory is replaced, never written through.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from pyro_vae.checkpoint import CHECKPOINT, PREVIOUS, describe, load_checkpoint, peek, restore_weights
from pyro_vae.config import ExperimentConfig, load_config, save_config
from pyro_vae.errors import CheckpointError, ConfigError
from pyro_vae.ex_post import load_ex_post_prior
from pyro_vae.experiment import Experiment
from pyro_vae.provenance import environment

log = logging.getLogger("pyro_vae")


def eval_name(split: str, num_samples: int, limit: Optional[int], checkpoint: str,
              matmul_precision: str = "ieee") -> str:
    """``eval_test_K5000_epoch10``, ``eval_test_K100_first500_epoch3_step120``
    or ``eval_test_K5000_bf16_epoch10``: an evaluation's file name says its
    settings and the checkpoint it evaluated, so none overwrites another."""
    return (f"eval_{split}_K{num_samples}" + (f"_first{limit}" if limit else "")
            + (f"_{matmul_precision}" if matmul_precision != "ieee" else "") + f"_{checkpoint}")


def float32_products(summary: dict[str, Any]) -> bool:
    """Whether an evaluation's matrix products were float32 (``eval.matmul_precision = "ieee"``;
    summaries written before the option were)."""
    return summary.get("matmul_precision", "ieee") == "ieee"


def checkpoint_tag(state: dict[str, Any]) -> str:
    """``epoch10`` (the end of epoch 10) or ``epoch3_step120`` (inside epoch 3)."""
    step = state.get("step_in_epoch", 0)
    return f"epoch{state['epoch'] + 1}_step{step}" if step else f"epoch{state['epoch']}"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @contextlib.contextmanager
    def atomic(self, name: str) -> Iterator[Path]:
        """A fresh temporary path (same suffix, unpredictable name) to write
        ``name`` to; renamed over ``RUN_DIR/name`` when the block succeeds."""
        target = self.path / name
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}")
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _has_checkpoint(self) -> bool:
        return self.checkpoint.is_file() or (self.path / PREVIOUS).is_file()

    def _remove(self) -> None:
        """``--overwrite``: delete the run directory, saying what goes.  A
        directory that is not a run directory is refused."""
        what = sorted(p.name for p in self.path.iterdir())
        if what and not (self.config_file.is_file() or self._has_checkpoint()):
            raise ConfigError(f"--overwrite deletes run directories only, and {self.path} is not one (it has no "
                              "config.toml or checkpoint); choose another --run-dir")
        held = ""
        if self._has_checkpoint():
            where = peek(self.checkpoint if self.checkpoint.is_file() else self.path / PREVIOUS)
            held = f"its checkpoint at {where}; " if where else "a checkpoint that does not load; "
        log.warning("--overwrite: removing %s (%sfiles: %s)", self.path, held, ", ".join(what) or "none")
        shutil.rmtree(self.path)

    def resume_state(self, config: ExperimentConfig, overwrite: bool = False, from_previous: bool = False,
                     map_location: str | torch.device = "cpu") -> Optional[dict[str, Any]]:
        """The checkpoint to resume ``config`` from (``None``: start afresh),
        after deleting the directory first if ``overwrite``.  Refused, with
        nothing written: a directory holding another experiment, and fewer
        ``train.epochs`` than the checkpoint has reached."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--run-dir {self.path} is a file, not a directory")
        if overwrite and self.path.exists():
            self._remove()
        if self.config_file.is_file():
            differences = load_config(self.config_file).experiment_differences(config)
            if differences:
                raise ConfigError(
                    f"{self.path} holds a different experiment ({'; '.join(differences)}). Choose another "
                    "--run-dir, or pass --overwrite to delete it and its checkpoint.")
        if not self._has_checkpoint():
            return None
        state = load_checkpoint(self.checkpoint, map_location=map_location, from_previous=from_previous)
        reached = state["epoch"] + (1 if state.get("step_in_epoch") else 0)
        if reached > config.train.epochs:
            raise ConfigError(
                f"{self.path} has a checkpoint at {describe(state)} but train.epochs = {config.train.epochs}; "
                f"set train.epochs to at least {reached} to train further, or run "
                f"`pyro-vae evaluate {self.path}` to evaluate it as it is.")
        return state

    def start_session(self, config: ExperimentConfig, state: Optional[dict[str, Any]]) -> None:
        """Write the resolved ``config`` and append this ``train`` call to
        ``sessions.jsonl``: its settings, what changed since the checkpoint's
        session (each change is also logged), and the environment."""
        previous = load_config(self.config_file) if self.config_file.is_file() else None
        changes = previous.setting_changes(config) if previous is not None and state is not None else []
        if state is not None:
            log.info("resuming %s from %s", self.path, describe(state))
        for change in changes:
            log.info("changed on resume: %s", change)
        self.path.mkdir(parents=True, exist_ok=True)
        with self.atomic("config.toml") as tmp:
            save_config(config, tmp)
        session = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "resumed_from": describe(state) if state else None,
            "changed": changes,
            "train": config.train.model_dump(),
            "eval": config.eval.model_dump(),
            **environment(),
        }
        sessions = self.path / "sessions.jsonl"
        earlier = sessions.read_text() if sessions.is_file() and not sessions.is_symlink() else ""
        with self.atomic("sessions.jsonl") as tmp:
            tmp.write_text(earlier + json.dumps(session) + "\n")

    def load_config(self) -> ExperimentConfig:
        if not self.path.exists():
            raise CheckpointError(f"run directory {self.path} does not exist; train one with "
                                  f"`pyro-vae train CONFIG --run-dir {self.path}`")
        if not self.config_file.is_file():
            raise CheckpointError(f"{self.path} is not a run directory: it has no config.toml")
        return load_config(self.config_file)

    def load_trained(self, device: torch.device | None = None,
                     from_previous: bool = False) -> tuple[Experiment, dict[str, Any]]:
        """Rebuild the experiment and load its checkpointed weights (and a
        prior fitted after training, :mod:`pyro_vae.ex_post`)."""
        experiment = Experiment.build(self.load_config(), device)
        state = load_checkpoint(self.checkpoint, map_location=experiment.device, from_previous=from_previous)
        restore_weights(experiment.model, experiment.guide, state, experiment.data.event_shape, self.checkpoint)
        load_ex_post_prior(self, experiment.model)
        experiment.objective.eval()  # evaluation mode: no training-only noise such as word dropout
        return experiment, state

    def write_metrics(self, history: list[dict]) -> None:
        """One row an epoch; the columns are the history's keys (the
        objective's metrics differ between objectives)."""
        fields = list(dict.fromkeys(key for row in history for key in row))
        with self.atomic("metrics.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)

    def write_json(self, name: str, data: dict) -> Path:
        with self.atomic(name) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
        return self.path / name

    def read_report(self) -> dict[str, Any]:
        path = self.path / "report.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; starting a new report", path)
            return {}

    def record_evaluation(self, summary: dict[str, Any], per_datapoint: dict[str, np.ndarray],
                          report: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Write ``eval_<settings>.json`` and ``.npz``, and append the summary
        to ``report.json``'s ``evaluations`` (``report``: fields to update
        besides); it becomes the report's ``eval`` unless it used reduced-precision
        products (``eval.matmul_precision``) and a float32 evaluation is there.
        Returns the summary as written (with its file name and time)."""
        stem = eval_name(summary["split"], summary["iw_samples"], summary.get("limit"), summary["checkpoint"],
                         summary.get("matmul_precision", "ieee"))
        summary = {**summary, "file": f"{stem}.json",
                   "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.write_json(f"{stem}.json", summary)
        with self.atomic(f"{stem}_per_datapoint.npz") as tmp:
            np.savez(tmp, **per_datapoint)
        full = self.read_report() | (report or {})
        if float32_products(summary) or not (full.get("eval") and float32_products(full["eval"])):
            full["eval"] = summary
        full["evaluations"] = [*full.get("evaluations", []), summary]
        self.write_json("report.json", full)
        return summary
