"""Gradient estimators against exact gradients.

On a binary-latent VAE small enough to enumerate (tests/enumerable.py), each
unbiased estimator's mean gradient over many independent draws must match
the exact gradient of its objective (the ELBO; VIMCO's E[L_K]) for every
parameter within a z-score of 4.5 (Bonferroni over ~34 parameters: a false
alarm about once in 5,000 runs); the biased estimators must be *detected* as
biased by the same test, which shows that it has the power to fail, and their
bias is printed.  On the linear-Gaussian VAE the reparameterized and the
score-function gradients match the closed-form ELBO gradient.
"""
import math

import pyro
import pytest
import torch

import enumerable
from linear_gaussian import LinearGaussianModel
from pyro_vae import registry
from pyro_vae.evaluate import evaluate

REPLICAS = 100  # copies of each datapoint in one batch: one backward averages REPLICAS draws
DRAWS = 300  # independent batches: the spread of their gradients gives the standard error
Z_LIMIT = 4.5


def gradient_draws(objective, params, x, draws=DRAWS, replicas=REPLICAS):
    """``[draws, P]``: each row the objective's gradient of ``-loss`` on the
    batch ``x`` repeated ``replicas`` times, divided by ``replicas`` (so each row
    estimates the gradient of the objective summed over ``x``)."""
    batch = x.repeat(replicas, 1)
    rows = []
    for _ in range(draws):
        grads = torch.autograd.grad(-objective(batch), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]) / replicas)
    return torch.stack(rows)


def z_scores(draws, exact):
    mean, standard_error = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    return (mean - exact) / standard_error.clamp(min=1e-12)


def build_objective(name, options, model, guide, x):
    objective = registry.OBJECTIVES.build(name, options)(model, guide).double()
    objective.prepare(x[:2])
    objective.eval()  # running baselines and moments stay where the test puts them
    return objective


UNBIASED = [
    ("trace_elbo", {}),
    ("trace_elbo", {"num_particles": 3}),
    ("tracegraph_elbo", {"baseline": "none"}),
    ("tracegraph_elbo", {"baseline": "decaying_avg"}),
    ("tracegraph_elbo", {"baseline": "neural", "num_particles": 2}),
    ("meanfield_elbo", {}),
    ("nvil", {}),
    ("disarm", {}),
    ("disarm", {"num_pairs": 3}),
    ("iwae", {"num_particles": 1}),  # L_1 is the ELBO
]


@pytest.mark.parametrize("name,options", UNBIASED, ids=[f"{n}{o or ''}" for n, o in UNBIASED])
def test_unbiased_estimators_match_the_exact_elbo_gradient(name, options):
    pyro.set_rng_seed(1)
    model, guide = enumerable.build()
    x = enumerable.data()
    params = [*model.parameters(), *guide.parameters()]
    exact = enumerable.exact_gradient(model, guide, lambda: enumerable.elbo(model, guide, x))
    objective = build_objective(name, options, model, guide, x)
    guide_scale = 1.0
    if name == "tracegraph_elbo" and options["baseline"] == "decaying_avg":
        objective.average.mean.fill_(-6.0)  # a baseline far from 0 must still leave the estimate unbiased
    if name == "nvil":
        objective.moments.mean.fill_(-4.0)
        objective.moments.var.fill_(9.0)  # the encoder's gradient is divided by max(1, sd) = 3
        guide_scale = 3.0
    draws = gradient_draws(objective, params, x)
    num_model = sum(p.numel() for p in model.parameters())
    draws[:, num_model:] *= guide_scale
    z = z_scores(draws, exact)
    assert z.abs().max() < Z_LIMIT, (name, z)
    assert (draws.mean(0) - exact).norm() < 0.1 * exact.norm()


@pytest.mark.parametrize("name", ["vimco", "iwae"])
def test_k_sample_bound_estimators_match_its_exact_gradient(name):
    """VIMCO and IWAE (here through the score function: binary latents)
    estimate the gradient of E[L_2], told apart from the ELBO's."""
    pyro.set_rng_seed(2)
    model, guide = enumerable.build()
    x = enumerable.data()
    params = [*model.parameters(), *guide.parameters()]
    exact = enumerable.exact_gradient(model, guide, lambda: enumerable.expected_bound(model, guide, x, 2))
    objective = build_objective(name, {"num_particles": 2}, model, guide, x)
    z = z_scores(gradient_draws(objective, params, x), exact)
    assert z.abs().max() < Z_LIMIT, z
    elbo_gradient = enumerable.exact_gradient(model, guide, lambda: enumerable.elbo(model, guide, x))
    assert z_scores(gradient_draws(objective, params, x, draws=100), elbo_gradient).abs().max() > Z_LIMIT


@pytest.mark.parametrize("name,options", [("relaxed", {"temperature": 0.5}), ("straight_through", {})])
def test_biased_estimators_are_detected_and_their_bias_reported(name, options, capsys):
    """The same test flags the relaxed and straight-through gradients: they
    are biased by design.  Their relative bias is printed (run pytest -s)."""
    pyro.set_rng_seed(3)
    model, guide = enumerable.build()
    x = enumerable.data()
    params = [*model.parameters(), *guide.parameters()]
    exact = enumerable.exact_gradient(model, guide, lambda: enumerable.elbo(model, guide, x))
    draws = gradient_draws(build_objective(name, options, model, guide, x), params, x)
    z = z_scores(draws, exact)
    bias = (draws.mean(0) - exact).norm() / exact.norm()
    with capsys.disabled():
        print(f"\n{name}: relative bias |E[g] - grad| / |grad| = {bias:.3f}, max |z| = {z.abs().max():.1f}")
    assert z.abs().max() > Z_LIMIT


def test_importance_sampled_log_likelihood_converges_to_the_exact_value():
    """E[L_1] = ELBO exactly (K=1 must work); E[L_K] rises towards log p(x).
    (A broad guide, so that K=1000 samples cover every z of high posterior mass.)"""
    pyro.set_rng_seed(4)
    model, guide = enumerable.build(guide_scale=0.3)
    x = enumerable.data()
    with torch.no_grad():
        log_px = enumerable.log_marginal(model, guide, x)
        elbo = enumerable.elbo(model, guide, x)
        bound_2 = enumerable.expected_bound(model, guide, x, 2)
    assert (elbo < bound_2).all() and (bound_2 < log_px).all()
    repeats = 4000
    batch = x.repeat(repeats, 1)
    means = {}
    for k in (1, 2, 10, 1000):
        result = evaluate(model, guide, [batch], num_samples=k, chunk_size=250, progress=False)
        means[k] = torch.tensor(result.log_likelihood).reshape(repeats, 3)
    se = lambda k: means[k].std(0) / math.sqrt(repeats)
    assert ((means[1].mean(0) - elbo).abs() < 5 * se(1)).all()
    assert ((means[2].mean(0) - bound_2).abs() < 5 * se(2)).all()
    gaps = [(log_px - means[k].mean(0)).mean().item() for k in (1, 10, 1000)]
    assert gaps[0] > gaps[1] > gaps[2] > -0.01
    assert abs(gaps[2]) < 0.02


def test_score_function_and_reparameterized_gradients_match_the_closed_form_elbo():
    """On the linear-Gaussian VAE, the gradient of the closed-form ELBO with
    respect to the guide's mean shift and log scale factor is matched by the
    reparameterized estimators and by the score function (the guide's
    ``rsample`` switched off), the latter with a much larger spread."""
    from linear_gaussian import LearnableMeanFieldGuide

    pyro.set_rng_seed(5)
    model = LinearGaussianModel()
    x = model.sample_data(4)
    guide = LearnableMeanFieldGuide(model)
    params = list(guide.parameters())
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(guide.exact_elbo(x).sum(), params)])
    spreads = {}
    for name, reparameterized in [("trace_elbo", True), ("meanfield_elbo", True), ("iwae", True), ("trace_elbo", False),
                                  ("tracegraph_elbo", False), ("nvil", False)]:
        guide.reparameterized = reparameterized
        objective = build_objective(name, {"num_particles": 1} if name == "iwae" else {}, model, guide, x)
        draws = gradient_draws(objective, params, x, draws=200, replicas=200)
        assert z_scores(draws, exact).abs().max() < Z_LIMIT, (name, reparameterized)
        spreads[name, reparameterized] = draws.var(0).sum().item()
    assert spreads["trace_elbo", False] > 10 * spreads["trace_elbo", True]


def test_iwae_bound_rises_with_k_towards_log_px_on_the_linear_gaussian_vae():
    """On the linear-Gaussian VAE: with the exact posterior as guide every
    w_k = p(x), so the IWAE loss is -log p(x) for any K, without noise; with
    a mean-field guide E[L_1] is the closed-form ELBO, E[L_K] rises with K
    (1 < 5 < 50) and stays below log p(x), the gap closing."""
    from linear_gaussian import MeanFieldGuide, PosteriorGuide

    pyro.set_rng_seed(6)
    model = LinearGaussianModel()
    x = model.sample_data(4)
    log_px = model.marginal().log_prob(x)
    for k in (1, 7):
        exact = registry.OBJECTIVES.build("iwae", {"num_particles": k})(model, PosteriorGuide(model))
        assert torch.allclose(exact(x), -log_px.sum(), rtol=1e-10)
    guide = MeanFieldGuide(model)
    replicas, draws = 25, 200
    batch = x.repeat(replicas, 1)
    means, errors = {}, {}
    with torch.no_grad():
        for k in (1, 5, 50):
            iwae = registry.OBJECTIVES.build("iwae", {"num_particles": k})(model, guide)
            totals = torch.stack([-iwae(batch) / replicas for _ in range(draws)])  # each: sum_b L_K(x_b)
            means[k], errors[k] = totals.mean(), totals.std() / math.sqrt(draws)
    assert (means[1] - guide.exact_elbo(x).sum()).abs() < 5 * errors[1]
    assert means[5] - means[1] > 5 * errors[1] and means[50] - means[5] > 5 * errors[5]
    assert log_px.sum() - means[50] > -5 * errors[50]
    assert log_px.sum() - means[50] < 0.2 * (log_px.sum() - means[1])
