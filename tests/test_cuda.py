"""CUDA paths; skipped where no CUDA device is present."""
import math

import pytest
import torch

from conftest import requires_cuda
from pyro_vae.config import config_from_dict
from pyro_vae.evaluate import evaluate
from pyro_vae.experiment import Experiment
from pyro_vae.rundir import RunDir
from pyro_vae.train import fit


@requires_cuda
def test_train_and_evaluate_on_cuda(tiny_raw, tmp_path):
    tiny_raw["train"].update(device="cuda", limit=500)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    assert experiment.data["train"].pixels.is_cuda
    history = fit(experiment, RunDir(tmp_path), progress=False)
    assert all(p.is_cuda for p in experiment.model.parameters())
    result = evaluate(experiment.model, experiment.guide, experiment.data["test"].head(50).batches(25), 30,
                      chunk_size=7, progress=False)
    assert result.log_likelihood.shape == (50,) and history[-1]["valid_elbo"] < 0
    # the checkpoint loads back onto the CPU
    cpu = Experiment.build(config_from_dict({**tiny_raw, "train": {**tiny_raw["train"], "device": "cpu"}}))
    cpu.model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)["model"])


@requires_cuda
@pytest.mark.parametrize("objective", [{"name": "nvil", "baseline_lr": 0.01}, {"name": "disarm"},
                                       {"name": "vimco", "num_particles": 3}, {"name": "relaxed"},
                                       {"name": "straight_through"}, {"name": "meanfield_elbo"},
                                       {"name": "tracegraph_elbo", "baseline": "neural"}])
def test_binary_latent_estimators_train_on_cuda(objective, tiny_raw, tmp_path):
    tiny_raw["data"]["binarization"] = "static"
    tiny_raw["prior"] = {"name": "bernoulli", "learned": True}
    tiny_raw["guide"] = {"name": "bernoulli", "hidden": [32]}
    tiny_raw["objective"] = objective
    tiny_raw["train"].update(device="cuda", limit=300)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    history = fit(experiment, RunDir(tmp_path), progress=False)
    assert all(p.is_cuda for p in experiment.objective.parameters())
    assert math.isfinite(history[-1]["train_elbo"]) and math.isfinite(history[-1]["valid_elbo"])
