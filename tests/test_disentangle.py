"""beta-VAE, capacity and beta-TCVAE objectives, the KL decomposition, MIG
and the shapes data, against exact answers."""

import numpy as np
import pyro
import pytest
import torch

from conftest import requires_cuda
from linear_gaussian import LinearGaussianModel
from pyro_vae.aggregate import aggregate_log_densities, mss_log_weights, mws_log_weights, \
    pairwise_log_density
from pyro_vae.config import config_from_dict
from pyro_vae.decompose import decompose
from pyro_vae.experiment import Experiment
from pyro_vae.mig import mutual_information_gap
from pyro_vae.registry import OBJECTIVES


def tiny_experiment(tiny_raw, objective):
    tiny_raw["objective"] = objective
    return Experiment.build(config_from_dict(tiny_raw))


def loss_and_grads(objective, x, seed=0):
    pyro.set_rng_seed(seed)
    objective.zero_grad()
    loss = objective(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


def test_beta_one_is_the_elbo_in_loss_and_gradient(tiny_raw):
    experiment = tiny_experiment(tiny_raw, {"name": "beta", "beta": 1.0})
    x = experiment.data["train"].batch(slice(0, 50))
    reference = OBJECTIVES.build("meanfield_elbo", {})(experiment.model, experiment.guide)
    loss, grads = loss_and_grads(experiment.objective, x)
    ref_loss, ref_grads = loss_and_grads(reference, x)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    four = OBJECTIVES.build("beta", {"beta": 4.0})(experiment.model, experiment.guide)
    loss4, _ = loss_and_grads(four, x)
    kl = experiment.objective.metrics["kl"]
    assert loss4.item() == pytest.approx(loss.item() + 3 * kl.item() * 50, rel=1e-5)  # the same draw, 3 more KLs
    assert four.metrics["elbo"] == pytest.approx(experiment.objective.metrics["elbo"])  # the ELBO is reported as is


def test_capacity_follows_its_schedule_and_penalises_the_distance_to_it(tiny_raw):
    experiment = tiny_experiment(tiny_raw, {"name": "capacity", "gamma": 10.0, "c_max": 20.0, "anneal_steps": 100})
    objective = experiment.objective
    assert [objective.capacity(s) for s in (0, 25, 50, 100, 1000)] == [0.0, 5.0, 10.0, 20.0, 20.0]
    x = experiment.data["train"].batch(slice(0, 40))
    for step in (0, 60):
        objective.context.step = step
        pyro.set_rng_seed(1)
        loss = objective(x)
        pyro.set_rng_seed(1)
        reference = OBJECTIVES.build("meanfield_elbo", {})(experiment.model, experiment.guide)
        reference(x)
        per_datapoint_kl = reference.metrics["kl"]  # batch mean; recompute per datapoint below
        assert objective.metrics["capacity"] == pytest.approx(objective.capacity(step))
        assert objective.metrics["kl"] == pytest.approx(per_datapoint_kl)
    # by hand on one draw: -(sum_b log p(x_b|z_b) - gamma |KL_b - C|)
    from pyro_vae.traces import draw_particles

    pyro.set_rng_seed(2)
    loss = objective(x)
    pyro.set_rng_seed(2)
    particles = draw_particles(experiment.model, experiment.guide, x, 1, 1)
    expected = -(particles.log_likelihood() - 10.0 * (particles.kl() - 12.0).abs()).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_beta_tc_with_unit_weights_is_the_elbo_sample_by_sample(tiny_raw):
    """alpha = beta = gamma = 1 telescopes to log p(x|z) + log p(z) - log q(z|x):
    the same loss and gradient as Pyro's Trace_ELBO on the same draw."""
    from pyro.infer import Trace_ELBO

    experiment = tiny_experiment(tiny_raw, {"name": "beta_tc", "alpha": 1.0, "beta": 1.0, "gamma": 1.0})
    experiment.objective.context.num_train = 1000
    x = experiment.data["train"].batch(slice(0, 30))
    experiment.objective.nesting(x)  # (found by a traced run that draws from the RNG)
    loss, grads = loss_and_grads(experiment.objective, x)
    assert loss.item() == pytest.approx(-30 * experiment.objective.metrics["elbo"].item(), rel=1e-5)
    pyro.set_rng_seed(0)
    experiment.objective.zero_grad()
    with pyro.plate("_particles", 1, dim=-2):  # the same draw as the objective's particle plate of one
        ref = Trace_ELBO(max_plate_nesting=2).differentiable_loss(experiment.model, experiment.guide, x)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for name, p in experiment.objective.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-5), name
    six = OBJECTIVES.build("beta_tc", {"beta": 6.0})(experiment.model, experiment.guide)
    six.context.num_train = 1000
    six.nesting(x)
    pyro.set_rng_seed(0)
    loss6 = six(x)
    tc = six.metrics["total_correlation"].item()
    assert loss6.item() == pytest.approx(loss.item() + 5 * 30 * tc, rel=1e-4)


def gaussian_aggregate(dim=3, noise=0.5, n=20000, seed=0):
    """Datapoints mu_n ~ N(0, C) (C correlated) and q(z | n) = N(mu_n, noise^2 I):
    the aggregate is N(0, C + noise^2 I), whose total correlation is
    (1/2) sum_d log Sigma_dd - (1/2) log det Sigma."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.3 * torch.eye(dim, dtype=torch.float64)
    means = torch.randn(n, dim, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    sigma = cov + noise**2 * torch.eye(dim, dtype=torch.float64)
    tc = 0.5 * sigma.diagonal().log().sum() - 0.5 * torch.logdet(sigma)
    return means, noise, tc.item()


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_minibatch_estimators_of_the_total_correlation_converge_to_the_closed_form(estimator):
    means, noise, true_tc = gaussian_aggregate()
    g = torch.Generator().manual_seed(1)
    errors = []
    for batch in (16, 128, 1024):
        estimates = []
        for _ in range(max(1, 4096 // batch)):
            idx = torch.randperm(len(means), generator=g)[:batch]
            mu = means[idx]
            z = mu + noise * torch.randn(mu.shape, generator=g, dtype=mu.dtype)
            base = torch.distributions.Normal(mu, noise)
            log_pairs = pairwise_log_density(base, z)
            weights = (mws_log_weights(batch) if estimator == "mws" else mss_log_weights(batch, len(means))).double()
            log_qz, log_qz_dims = aggregate_log_densities(log_pairs, weights)
            estimates.append((log_qz - log_qz_dims).mean().item())
        errors.append(abs(float(np.mean(estimates)) - true_tc))
    assert true_tc > 0.5
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05 * true_tc + 0.02, (errors, true_tc)


def test_beta_tc_uses_the_training_set_size_with_mss_alone(tiny_raw):
    experiment = tiny_experiment(tiny_raw, {"name": "beta_tc"})
    x = experiment.data["train"].batch(slice(0, 20))
    for estimator, changes in (("mss", True), ("mws", False)):
        objective = OBJECTIVES.build("beta_tc", {"estimator": estimator})(experiment.model, experiment.guide)
        objective.nesting(x)
        tc = []
        for size in (100, 100_000):
            objective.context.num_train = size
            pyro.set_rng_seed(0)
            objective(x)
            tc.append(objective.metrics["total_correlation"].item())
        assert (tc[0] != tc[1]) is changes


def test_mss_weights_are_a_mixture_per_row():
    w = mss_log_weights(6, 100).exp()
    assert torch.allclose(w.sum(1), torch.ones(6)) and torch.allclose(w.diagonal(), torch.full((6,), 0.01))


class CorrelatedGuide(torch.nn.Module):
    """q(z | x) = N(E[z|x] @ mix^T + shift, diag(scales^2)): linear in x, so over
    x ~ p(x) the aggregate is N(shift, mix (I - S) mix^T + diag(scales^2)),
    S the exact posterior's covariance; ``mix`` correlates its dimensions."""

    def __init__(self, model, mix, shift, scales):
        super().__init__()
        self.model, self.mix, self.shift, self.scales = model, mix, shift, scales

    def distribution(self, x):
        loc = self.model.posterior(x).mean @ self.mix.T + self.shift
        return pyro.distributions.Normal(loc, self.scales.expand_as(loc)).to_event(1)

    def forward(self, x, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.distribution(x))


@pytest.fixture(scope="module")
def linear_gaussian_split():
    torch.manual_seed(0)
    model = LinearGaussianModel(latent_dim=3, data_dim=5, noise=0.7)
    mix = torch.tensor([[1.0, 0.9, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 1.0]], dtype=torch.float64)
    guide = CorrelatedGuide(model, mix, torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64),
                            torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64))
    return model, guide, model.sample_data(3000)


def test_decomposition_over_a_split_matches_the_closed_form(linear_gaussian_split):
    """The linear-Gaussian VAE with a guide linear in x (:class:`CorrelatedGuide`):
    MI, TC and dimension-wise KL are Gaussian entropies and KLs in closed form."""
    model, guide, x = linear_gaussian_split
    pyro.set_rng_seed(0)
    parts = decompose(model, guide, list(x.split(500)), progress=False)
    post_cov = model.posterior(x[:1]).covariance_matrix[0]
    s2 = guide.scales**2
    sigma = guide.mix @ (torch.eye(3, dtype=torch.float64) - post_cov) @ guide.mix.T + torch.diag(s2)
    exact = {
        "mutual_information": 0.5 * torch.logdet(sigma) - 0.5 * s2.log().sum(),
        "total_correlation": 0.5 * sigma.diagonal().log().sum() - 0.5 * torch.logdet(sigma),
        "dimensionwise_kl": 0.5 * (sigma.diagonal() + guide.shift**2 - 1 - sigma.diagonal().log()).sum(),
    }
    assert exact["total_correlation"] > 0.2  # a correlated aggregate
    summary = parts.summary()
    for name, value in exact.items():
        estimate = summary[name]
        assert abs(estimate["mean"] - value.item()) < 4 * estimate["se"] + 0.03, (name, estimate, value.item())
    # the terms telescope: MI + TC + dwKL = log q(z|x) - log p(z) per datapoint; with the reconstruction, the ELBO
    kl = parts.terms["mutual_information"] + parts.terms["total_correlation"] + parts.terms["dimensionwise_kl"]
    assert np.allclose(kl, parts.terms["kl"]) and np.allclose(parts.terms["elbo"], parts.terms["reconstruction"] - kl)
    analytic_kl = torch.distributions.kl_divergence(guide.distribution(x), torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(3, dtype=torch.float64), 1.0), 1)).mean().item()
    assert abs(summary["kl"]["mean"] - analytic_kl) < 4 * summary["kl"]["se"]
    assert summary["active_units"] == 3


def test_mig_is_one_for_axis_aligned_codes_and_low_for_mixed_ones():
    rng = np.random.default_rng(0)
    factors = np.stack([rng.integers(0, 5, 5000), rng.integers(0, 8, 5000)], 1)
    noise = rng.normal(size=(5000, 3))
    aligned = np.concatenate([factors + 0.01 * noise[:, :2], noise[:, 2:]], 1)
    assert mutual_information_gap(aligned, factors)["mig"] == pytest.approx(1.0, abs=0.02)
    mixed = np.stack([factors[:, 0] + factors[:, 1], factors[:, 0] - factors[:, 1], noise[:, 2]], 1)
    assert mutual_information_gap(mixed, factors)["mig"] < 0.3
    assert mutual_information_gap(noise, factors)["mig"] < 0.05
    duplicated = np.stack([factors[:, 0], factors[:, 0], factors[:, 1]], 1).astype(float)
    result = mutual_information_gap(duplicated, factors)  # factor 0 in two dimensions: no gap; factor 1: all
    assert result["per_factor"] == pytest.approx([0.0, 1.0], abs=0.01) and result["mig"] == pytest.approx(0.5, abs=0.01)


def test_mig_normalises_by_the_factors_entropy_over_exactly_bins_bins():
    """``discretise`` puts each code dimension in ``bins`` equal-width bins,
    0 .. bins - 1, the extremes in the first and last; the gap is divided by
    the factor's empirical entropy (0.33 nats for a 90/10 factor, not log 2):
    a dimension that copies such a factor has MIG 1."""
    from pyro_vae.mig import discretise

    rng = np.random.default_rng(0)
    codes = rng.uniform(size=(2000, 3))
    bins = discretise(codes, bins=7)
    for j in range(3):
        assert set(np.unique(bins[:, j]).tolist()) == set(range(7))
    assert bins[codes[:, 0].argmax(), 0] == 6 and bins[codes[:, 0].argmin(), 0] == 0
    factor = (rng.uniform(size=5000) < 0.1).astype(int)[:, None]
    copied = np.concatenate([factor + 0.01 * rng.normal(size=(5000, 1)), rng.normal(size=(5000, 1))], 1)
    assert mutual_information_gap(copied, factor)["mig"] == pytest.approx(1.0, abs=0.03)


def test_decomposition_summary_is_the_mean_and_its_standard_error():
    """Each term's summary: the mean over datapoints and its standard error std (ddof 1) / sqrt(N)."""
    from pyro_vae.decompose import Decomposition

    values = np.array([1.0, 2.0, 3.0, 6.0])
    summary = Decomposition({"t": values}, np.zeros((4, 2))).summary()
    assert summary["t"]["mean"] == pytest.approx(3.0)
    assert summary["t"]["se"] == pytest.approx(values.std(ddof=1) / 2.0)


def test_shapes_cover_every_factor_combination_once():
    from pyro_vae.data.shapes import render

    images, labels = render(orientations=4, positions=4)
    assert images.shape == (3 * 6 * 4 * 16, 64, 64) and set(np.unique(images)) == {0, 255}
    assert len({tuple(row) for row in labels}) == len(labels)
    area = (images > 0).reshape(len(images), -1).sum(1)
    for shape in range(3):  # a larger scale draws more pixels
        mean_area = [area[(labels[:, 0] == shape) & (labels[:, 1] == s)].mean() for s in range(6)]
        assert all(a < b for a, b in zip(mean_area, mean_area[1:]))
    again, _ = render(orientations=4, positions=4)
    assert np.array_equal(images, again)
    # a position step moves the sprite's centre of mass right / down
    ys, xs = np.nonzero(images[0])
    one_right = images[(labels[:, :3] == labels[0, :3]).all(1) & (labels[:, 3] == 1) & (labels[:, 4] == 0)][0]
    assert np.nonzero(one_right)[1].mean() > xs.mean() + 5


def test_shapes_dataset_splits_and_cache(tmp_path, monkeypatch):
    from pyro_vae.registry import DATASETS

    monkeypatch.setenv("PYRO_VAE_CACHE", str(tmp_path))
    data = DATASETS.build("shapes", {"orientations": 2, "positions": 4}, device=torch.device("cpu"))
    sizes = {name: len(split) for name, split in data.splits.items()}
    assert sum(sizes.values()) == 3 * 6 * 2 * 16 and sizes["train"] == int(0.8 * 576)
    assert data["test"].labels.shape == (sizes["test"], 5) and data.event_shape == (1, 64, 64)
    assert list(tmp_path.glob("shapes-*.npz"))
    cached = DATASETS.build("shapes", {"orientations": 2, "positions": 4}, device=torch.device("cpu"))
    assert torch.equal(cached["train"].pixels, data["train"].pixels)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_train_and_evaluate_decompose_on_the_shapes_from_the_command_line(device, tmp_path, capsys, monkeypatch):
    import json

    import tomli_w

    from pyro_vae.cli import main

    monkeypatch.setenv("PYRO_VAE_CACHE", str(tmp_path / "cache"))
    config = {"data": {"name": "shapes", "orientations": 2, "positions": 4},
              "model": {"name": "mlp", "latent_dim": 4, "hidden": [32]}, "prior": {"name": "standard_normal"},
              "guide": {"name": "normal", "hidden": [32]}, "objective": {"name": "beta_tc", "beta": 6.0},
              "train": {"epochs": 2, "batch_size": 50, "device": device},
              "eval": {"iw_samples": 10, "decompose": True}}
    (tmp_path / "shapes.toml").write_text(tomli_w.dumps(config))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "shapes.toml"), "--run-dir", str(run), "--quiet"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["device"].startswith(device)
    parts = report["eval"]["decomposition"]
    assert {"reconstruction", "mutual_information", "total_correlation", "dimensionwise_kl", "kl", "elbo",
            "active_units"} <= set(parts)
    assert parts["elbo"]["mean"] == pytest.approx(report["eval"]["elbo"], abs=5 * parts["elbo"]["se"] + 1.0)
    assert 0.0 <= report["eval"]["mig"]["mig"] <= 1.0 and len(report["eval"]["mig"]["per_factor"]) == 5
    for picture in ("traversals.png", "kl_per_dim.png"):
        assert (run / picture).stat().st_size > 1000
    capsys.readouterr()
    assert main(["evaluate", str(run), "--quiet", "--decompose", "--split", "valid", "--iw-samples", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["decomposition"]["active_units"] <= 4 and "mig" in summary


def test_decompose_refuses_a_binary_latent(tiny_raw, tmp_path, capsys):
    import tomli_w

    from pyro_vae.cli import main

    tiny_raw.update(data={"name": "mnist", "binarization": "static"}, prior={"name": "bernoulli"},
                    guide={"name": "bernoulli", "hidden": []}, objective={"name": "disarm"})
    (tmp_path / "sbn.toml").write_text(tomli_w.dumps(tiny_raw))
    assert main(["train", str(tmp_path / "sbn.toml"), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    assert not (tmp_path / "run" / "traversals.png").exists()
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--quiet", "--decompose", "--iw-samples", "2"]) == 2
    assert "--decompose needs a guide with one continuous latent site" in capsys.readouterr().err
