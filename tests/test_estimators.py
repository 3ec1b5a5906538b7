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


def test_vimco_matches_the_exact_gradient_of_the_k_sample_bound():
    pyro.set_rng_seed(2)
    model, guide = enumerable.build()
    x = enumerable.data()
    params = [*model.parameters(), *guide.parameters()]
    exact = enumerable.exact_gradient(model, guide, lambda: enumerable.expected_bound(model, guide, x, 2))
    objective = build_objective("vimco", {"num_particles": 2}, model, guide, x)
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
    for name, reparameterized in [("trace_elbo", True), ("meanfield_elbo", True), ("trace_elbo", False),
                                  ("tracegraph_elbo", False), ("nvil", False)]:
        guide.reparameterized = reparameterized
        objective = build_objective(name, {}, model, guide, x)
        draws = gradient_draws(objective, params, x, draws=200, replicas=200)
        assert z_scores(draws, exact).abs().max() < Z_LIMIT, (name, reparameterized)
        spreads[name, reparameterized] = draws.var(0).sum().item()
    assert spreads["trace_elbo", False] > 10 * spreads["trace_elbo", True]
