"""CUDA paths; skipped where no CUDA device is present."""
import logging
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
def test_auto_chunks_on_cuda_probe_then_fill_half_the_free_memory(tiny_raw):
    """The first 16 samples size the rest; all K log weights come back, finite,
    and agree with explicit chunks within Monte-Carlo error."""
    from pyro_vae.evaluate import chunked_log_weights

    experiment = Experiment.build(config_from_dict({**tiny_raw, "train": {**tiny_raw["train"], "device": "cuda"}}))
    x = experiment.data["test"].batch(slice(0, 20))
    with torch.no_grad():
        auto = chunked_log_weights(experiment.model, experiment.guide, x, 3000, "auto", 1)
        fixed = chunked_log_weights(experiment.model, experiment.guide, x, 3000, 100, 1)
    assert auto.shape == (3000, 20) and torch.isfinite(auto).all()
    assert (auto.mean(0) - fixed.mean(0)).abs().max() < 5 * (fixed.std(0) / 3000**0.5).max()


@requires_cuda
@pytest.mark.parametrize("objective", [{"name": "nvil", "baseline_lr": 0.01}, {"name": "disarm"},
                                       {"name": "vimco", "num_particles": 3}, {"name": "relaxed"},
                                       {"name": "straight_through"}, {"name": "meanfield_elbo"},
                                       {"name": "tracegraph_elbo", "baseline": "neural"}, {"name": "iwae", "num_particles": 3}])
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


@requires_cuda
def test_a_mid_epoch_checkpoint_written_on_cuda_resumes_on_cuda_and_on_the_cpu(tiny_raw, tmp_path, monkeypatch):
    """The RNG states travel through a checkpoint loaded onto the GPU; a
    resume follows the uninterrupted run (up to CUDA's nondeterminism), and
    the same checkpoint also resumes on the CPU."""
    from pyro_vae.checkpoint import load_checkpoint
    from pyro_vae.train import Trainer

    tiny_raw["train"].update(device="cuda", limit=500, epochs=2, checkpoint_minutes=0)
    straight = Experiment.build(config_from_dict(tiny_raw))
    fit(straight, RunDir(tmp_path / "a"), progress=False)

    interrupted = Experiment.build(config_from_dict(tiny_raw))
    real_step, calls = Trainer.step, []

    def step_then_stop(self, *args, **kwargs):
        stopping = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 7:  # epoch 2, after its second step and the checkpoint that follows
            self.checkpoint()
            raise RuntimeError("killed")
        return stopping

    monkeypatch.setattr(Trainer, "step", step_then_stop)
    with pytest.raises(RuntimeError, match="killed"):
        fit(interrupted, RunDir(tmp_path / "b"), progress=False)
    monkeypatch.setattr(Trainer, "step", real_step)
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt", map_location="cuda")
    assert state["step_in_epoch"] == 2 and state["rng"]["torch"].is_cuda  # moved there by map_location
    resumed = Experiment.build(config_from_dict(tiny_raw))
    fit(resumed, RunDir(tmp_path / "b"), state, progress=False)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4)

    tiny_raw["train"]["device"] = "cpu"
    on_cpu = Experiment.build(config_from_dict(tiny_raw))
    mid_epoch_on_cuda = load_checkpoint(tmp_path / "b" / "checkpoint.prev.pt")  # epoch 2, step 4
    assert mid_epoch_on_cuda["step_in_epoch"] == 4 and mid_epoch_on_cuda["device"] == "cuda"
    history = fit(on_cpu, RunDir(tmp_path / "c"), mid_epoch_on_cuda, progress=False)
    assert len(history) == 2 and math.isfinite(history[-1]["valid_elbo"])


@requires_cuda
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("objective", [{"name": "meanfield_elbo", "free_bits": 0.1}, {"name": "trace_elbo"},
                                       {"name": "tracegraph_elbo"}, {"name": "iwae", "num_particles": 3},
                                       {"name": "beta", "beta": 4.0}, {"name": "capacity", "anneal_steps": 5},
                                       {"name": "beta_tc", "estimator": "mss"}])
def test_gaussian_latent_objectives_train_on_cuda_eager_and_compiled(objective, compile, tiny_raw, tmp_path, caplog):
    """The trainer's step, eager and with ``train.compile`` (Triton kernels:
    the whole step, its Adam update included), for every objective of Gaussian
    latents; the compiled run's first-epoch loss is the eager run's (the same
    draws: ``fallback_random``)."""
    tiny_raw["objective"] = objective
    tiny_raw["train"].update(device="cuda", limit=300, compile=compile)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        history = fit(experiment, RunDir(tmp_path), progress=False)
    assert all(p.is_cuda for p in experiment.objective.parameters())
    assert math.isfinite(history[-1]["train_elbo"]) and math.isfinite(history[-1]["valid_elbo"])
    if compile:
        if objective["name"] != "tracegraph_elbo":  # (Pyro's handlers: it runs eagerly, by design)
            assert experiment.objective.__dict__["forward"].compiled is not None  # captured, not fallen back
            assert "torch.compile cannot compile" not in caplog.text  # the whole step neither
        tiny_raw["train"]["compile"] = False
        eager = fit(Experiment.build(config_from_dict(tiny_raw)), RunDir(tmp_path / "eager"), progress=False)
        assert history[-1]["train_elbo"] == pytest.approx(eager[-1]["train_elbo"], rel=1e-4)


@requires_cuda
def test_the_is_log_likelihood_on_cuda_is_the_cpus_within_monte_carlo_error(tiny_raw):
    """The same weights and images on each device: per image, the two K=2000
    estimates of the ELBO, and of log p(x) = log mean_k w_k, differ by less
    than 5 of their combined standard errors (the latter by the delta
    method, sd(w) / (mean(w) sqrt K))."""
    from pyro_vae.evaluate import chunked_log_weights, importance_log_likelihood

    tiny_raw["train"]["device"] = "cuda"
    gpu = Experiment.build(config_from_dict(tiny_raw))
    tiny_raw["train"]["device"] = "cpu"
    cpu = Experiment.build(config_from_dict(tiny_raw))
    cpu.objective.load_state_dict({k: v.cpu() for k, v in gpu.objective.state_dict().items()})
    x = gpu.data["test"].batch(slice(0, 20))
    num_samples, estimates = 2000, []
    for experiment, images in ((gpu, x), (cpu, x.cpu())):
        with torch.no_grad():
            log_w = chunked_log_weights(experiment.model, experiment.guide, images, num_samples, "auto", 1).double().cpu()
        assert log_w.shape == (num_samples, 20) and torch.isfinite(log_w).all()
        w = (log_w - log_w.max(0).values).exp()
        estimates.append((log_w.mean(0), log_w.std(0) / num_samples**0.5,
                          importance_log_likelihood(log_w), w.std(0) / (w.mean(0) * num_samples**0.5)))
    (elbo_g, se_g, ll_g, lse_g), (elbo_c, se_c, ll_c, lse_c) = estimates
    assert ((elbo_g - elbo_c).abs() < 5 * (se_g**2 + se_c**2).sqrt()).all()
    assert ((ll_g - ll_c).abs() < 5 * (lse_g**2 + lse_c**2).sqrt()).all()
    assert (ll_g >= elbo_g - 5 * se_g).all()

