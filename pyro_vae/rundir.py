"""The run directory: one experiment's config, checkpoint, metrics and pictures.

::

    RUN_DIR/config.toml          the resolved config (every default filled in)
    RUN_DIR/checkpoint.pt        model, guide, objective state, optimizer, epoch, history (each epoch)
    RUN_DIR/metrics.csv          epoch, train_loss, train_elbo, the objective's other metrics, valid_elbo, seconds
    RUN_DIR/samples.png          64 samples from the prior
    RUN_DIR/reconstructions.png  test digits beside their reconstructions
    RUN_DIR/curves.png           ELBO per epoch
    RUN_DIR/report.json          training summary and the final evaluation
    RUN_DIR/eval_<split>.json    `pyro-vae evaluate` results (+ per-datapoint .npz)
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pyro_vae.checkpoint import CHECKPOINT, load_checkpoint
from pyro_vae.config import ExperimentConfig, load_config, save_config
from pyro_vae.errors import CheckpointError, ConfigError
from pyro_vae.experiment import Experiment


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

    def prepare(self, config: ExperimentConfig, overwrite: bool = False) -> None:
        """Create the directory for ``config``.  A directory holding another
        experiment is refused (no finished work is lost) unless ``overwrite``."""
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        if self.config_file.is_file():
            saved = load_config(self.config_file)
            if not saved.same_experiment(config):
                raise ConfigError(
                    f"{self.path} holds a different experiment (see its config.toml). Choose another "
                    "--run-dir, or pass --overwrite to delete it."
                )
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(config, self.config_file)

    def load_config(self) -> ExperimentConfig:
        if not self.config_file.is_file():
            raise CheckpointError(f"{self.path} is not a run directory: it has no config.toml")
        return load_config(self.config_file)

    def load_trained(self, device: torch.device | None = None) -> tuple[Experiment, dict[str, Any]]:
        """Rebuild the experiment and load its checkpointed weights."""
        experiment = Experiment.build(self.load_config(), device)
        state = load_checkpoint(self.checkpoint, map_location=experiment.device)
        try:
            experiment.model.load_state_dict(state["model"])
            experiment.guide.load_state_dict(state["guide"])
        except RuntimeError as exc:
            raise CheckpointError(f"{self.checkpoint} does not fit the model in config.toml: {exc}") from None
        return experiment, state

    def write_metrics(self, history: list[dict]) -> None:
        """One row an epoch; the columns are the history's keys (the
        objective's metrics differ between objectives)."""
        fields = list(dict.fromkeys(key for row in history for key in row))
        with open(self.path / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)

    def write_json(self, name: str, data: dict) -> Path:
        path = self.path / name
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path
