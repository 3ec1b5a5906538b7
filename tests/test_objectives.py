"""Objectives and KL terms against exact answers, and the objective protocol."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from linear_gaussian import LinearGaussianModel, MeanFieldGuide
from pyro_vae import registry


def test_analytic_kl_matches_monte_carlo_kl():
    """KL(q || p) for the catalogue's guide family and prior: closed form vs
    the Monte-Carlo mean of log q(z) - log p(z) over 400k draws."""
    torch.manual_seed(0)
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=4)(3)
    q = dist.Normal(torch.randn(3, 4), torch.rand(3, 4) + 0.3).to_event(1)
    analytic = kl_divergence(q, prior)
    z = q.sample((400_000,))
    log_ratio = q.log_prob(z) - prior.log_prob(z)
    monte_carlo, standard_error = log_ratio.mean(0), log_ratio.std(0) / 400_000**0.5
    assert analytic.shape == (3,)
    assert (abs(analytic - monte_carlo) < 5 * standard_error).all()


@pytest.mark.parametrize("name", ["trace_elbo", "meanfield_elbo", "tracegraph_elbo", "nvil"])
def test_objectives_estimate_the_exact_elbo(name):
    """The loss's value and the `elbo` metric over many particles -> the mean
    of log p(x) - KL(q || p(z|x)) (for the ELBO objectives, loss = -ELBO)."""
    model = LinearGaussianModel()
    guide = MeanFieldGuide(model)
    x = model.sample_data(20)
    objective = registry.OBJECTIVES.build(name, {"num_particles": 20_000})(model, guide).double()
    loss = objective(x)
    exact = guide.exact_elbo(x).mean().item()
    assert -loss.item() / 20 == pytest.approx(exact, abs=0.03)
    assert objective.metrics["elbo"].item() == pytest.approx(exact, abs=0.03)
    assert objective.metrics["loss"].item() == pytest.approx(loss.item() / 20)


def test_vimco_loss_is_the_k_sample_bound_and_its_elbo_metric_the_elbo():
    model = LinearGaussianModel()
    guide = MeanFieldGuide(model)
    x = model.sample_data(20).repeat(200, 1)
    objective = registry.OBJECTIVES.build("vimco", {"num_particles": 10})(model, guide)
    loss = objective(x).item() / x.shape[0]
    elbo, log_px = guide.exact_elbo(x).mean().item(), model.marginal().log_prob(x).mean().item()
    assert objective.metrics["elbo"].item() == pytest.approx(elbo, abs=0.05)
    assert elbo + 0.1 < -loss < log_px  # ELBO < E[L_10] < log p(x)
    assert objective.metrics["iw_bound"].item() == pytest.approx(-loss)


def test_meanfield_elbo_equals_pyros_tracemeanfield_elbo():
    """Same draws, same loss and same gradients as Pyro's TraceMeanField_ELBO
    on a reparameterized catalogue pair."""
    from pyro.infer import TraceMeanField_ELBO

    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=3)
    model = registry.MODELS.build("mlp", {"latent_dim": 3, "hidden": [8]}, prior=prior, event_shape=(6,))
    guide = registry.GUIDES.build("normal", {"hidden": [8]}, event_shape=(6,), latent_dim=3)
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    ours = registry.OBJECTIVES.build("meanfield_elbo", {})(model, guide)
    pyros = TraceMeanField_ELBO()(model, guide)
    ours.prepare(x)  # finds the plate nesting, which draws from the RNG
    results = []
    for loss_fn in (ours, pyros):
        pyro.set_rng_seed(7)
        loss = loss_fn(x)
        results.append((loss, torch.autograd.grad(loss, list(ours.parameters()))))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_a, grads_b))


def _gaussian_pair(latent_dim=3, pixels=6):
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=latent_dim)
    model = registry.MODELS.build("mlp", {"latent_dim": latent_dim, "hidden": [8]}, prior=prior, event_shape=(pixels,))
    guide = registry.GUIDES.build("normal", {"hidden": [8]}, event_shape=(pixels,), latent_dim=latent_dim)
    return model, guide


@pytest.mark.parametrize("latent", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("direct", [True, False])
def test_trace_elbo_equals_pyros_trace_elbo(latent, num_particles, direct):
    """Same draws, same loss and same gradients as Pyro's Trace_ELBO:
    pathwise for Gaussian latents, the score function with each datapoint's
    own signal for Bernoulli latents (where the model's, the prior's and the
    encoder's gradients all differ if a term is dropped), with one and with
    three vectorized particles, on traces built directly and by Pyro."""
    from pyro.infer import Trace_ELBO

    from pyro_vae.traces import builds_traces_directly

    model, guide = _gaussian_pair() if latent == "gaussian" else _bernoulli_pair()
    model.direct_traces = direct
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    ours = registry.OBJECTIVES.build("trace_elbo", {"num_particles": num_particles})(model, guide)
    ours.prepare(x)  # finds the plate nesting, which draws from the RNG
    pyros = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                       max_plate_nesting=ours.nesting(x))
    params = list(ours.parameters())
    results = []
    for loss_fn in (ours, lambda x: pyros.differentiable_loss(model, guide, x)):
        pyro.set_rng_seed(7)
        loss = loss_fn(x)
        results.append((loss, torch.autograd.grad(loss, params)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_a, grads_b))
    assert ours.metrics["elbo"].item() == pytest.approx(-loss_a.item() / 5, abs=1e-5)
    assert builds_traces_directly(model, guide) == direct


def test_objective_protocol():
    """build(name, options)(model, guide) is a module; train/eval reach the
    model and guide; a baseline network is its own parameter group with
    objective.baseline_lr; the relaxed temperature follows the context's step."""
    prior = registry.PRIORS.build("bernoulli", {}, latent_dim=4)
    model = registry.MODELS.build("linear", {"latent_dim": 4}, prior=prior, event_shape=(6,))
    guide = registry.GUIDES.build("bernoulli", {"hidden": []}, event_shape=(6,), latent_dim=4)
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    nvil = registry.OBJECTIVES.build("nvil", {"baseline_lr": 0.05})(model, guide)
    assert isinstance(nvil, torch.nn.Module)
    nvil.prepare(x)
    groups = nvil.param_groups()
    assert len(groups) == 2 and groups[1]["lr"] == 0.05
    baseline_ids = {id(p) for p in nvil.baseline.parameters()}
    assert {id(p) for p in groups[1]["params"]} == baseline_ids
    assert not baseline_ids & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) == len(list(model.parameters())) + len(list(guide.parameters()))
    nvil.eval()
    assert not model.training and not guide.training
    nvil.train()
    assert model.training and guide.training
    relaxed = registry.OBJECTIVES.build("relaxed", {"temperature": 1.0, "anneal_rate": 1e-3,
                                                    "temperature_min": 0.2})(model, guide)
    relaxed(x)
    assert relaxed.metrics["temperature"].item() == pytest.approx(1.0)
    relaxed.context.step = 1000
    relaxed(x)
    assert relaxed.metrics["temperature"].item() == pytest.approx(math.exp(-1.0))
    relaxed.context.step = 10_000
    relaxed(x)
    assert relaxed.metrics["temperature"].item() == pytest.approx(0.2)


@pytest.mark.parametrize("name,options,match", [
    ("vimco", {"num_particles": 1}, "num_particles >= 2"),
    ("disarm", {}, "needs Bernoulli latents"),
    ("relaxed", {"temperature": 0.1, "temperature_min": 0.5}, "temperature_min <= temperature"),
])
def test_objectives_refuse_what_they_cannot_estimate(name, options, match):
    from pyro_vae.errors import ConfigError

    model = LinearGaussianModel()
    x = model.sample_data(4)
    with pytest.raises(ConfigError, match=match):
        registry.OBJECTIVES.build(name, options)(model, MeanFieldGuide(model))(x)


def test_meanfield_elbo_uses_the_analytic_kl():
    """With a likelihood that ignores z, TraceMeanField_ELBO's loss is exactly
    -log p(x) + KL(q || p) with no sampling noise: the analytic KL is used for
    the catalogue's prior and guide family inside the data plate."""
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=3)
    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.5
    x = torch.randn(4, 2)

    def model(x):
        with pyro.plate("data", 4):
            pyro.sample("z", prior(4))
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([4, 2]).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", 4):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    exact = -dist.Normal(0.0, 1.0).log_prob(x).sum() + kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)).sum()
    meanfield = registry.OBJECTIVES.build("meanfield_elbo", {})(model, guide)
    losses = torch.stack([meanfield(x) for _ in range(5)])
    assert torch.allclose(losses, exact.expand(5), atol=1e-5)
    trace = registry.OBJECTIVES.build("trace_elbo", {})(model, guide)
    assert torch.stack([trace(x) for _ in range(5)]).std() > 0.01  # the Monte-Carlo KL is noisy


@pytest.mark.parametrize("name", ["trace_elbo", "meanfield_elbo", "vimco"])
def test_losses_are_differentiable_modules(name):
    registry.load_catalogue()
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=2)
    model = registry.MODELS.build("mlp", {"latent_dim": 2, "hidden": [8]}, prior=prior, event_shape=(1, 4, 4))
    guide = registry.GUIDES.build("normal", {"hidden": [8]}, event_shape=(1, 4, 4), latent_dim=2)
    loss_fn = registry.OBJECTIVES.build(name, {"num_particles": 3})(model, guide)
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.5))
    loss_fn(x).backward()
    grads = [p.grad for p in loss_fn.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert len(pyro.get_param_store()) == 0  # parameters live in the modules


def test_vimco_leave_one_out_bounds_on_hand_built_weights():
    """log w = [0, log 3]: swapping w_1 for the geometric mean of the others
    (3) gives log 3; swapping w_2 for 1 gives log 1 = 0."""
    from pyro_vae.objectives.score import VIMCO

    log_w = torch.tensor([[0.0], [math.log(3.0)]])
    assert torch.allclose(VIMCO.leave_one_out_bounds(log_w), torch.tensor([[math.log(3.0)], [0.0]]))
    log_w = torch.tensor([[0.0], [math.log(2.0)], [math.log(8.0)]])  # others' geometric means: 4, sqrt 8, sqrt 2
    expected = torch.log(torch.tensor([[(4 + 2 + 8) / 3], [(1 + 8**0.5 + 8) / 3], [(1 + 2 + 2**0.5) / 3]]))
    assert torch.allclose(VIMCO.leave_one_out_bounds(log_w), expected)


def _bernoulli_pair(latent_dim=4, pixels=6):
    prior = registry.PRIORS.build("bernoulli", {}, latent_dim=latent_dim)
    model = registry.MODELS.build("linear", {"latent_dim": latent_dim}, prior=prior, event_shape=(pixels,))
    guide = registry.GUIDES.build("bernoulli", {"hidden": []}, event_shape=(pixels,), latent_dim=latent_dim)
    return model, guide


def test_nvil_uses_the_moments_of_earlier_batches_and_trains_its_baseline_by_squared_error():
    """In training mode the step's signal is centred and scaled with the
    moments *before* this batch's update (else the estimator would be biased),
    and the baseline's gradient is that of sum_b mean_k (l - c - b(x))^2."""
    model, guide = _bernoulli_pair()
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    nvil = registry.OBJECTIVES.build("nvil", {"baseline_hidden": []})(model, guide)
    nvil.prepare(x)
    with torch.no_grad():
        nvil.baseline.net.weight.zero_()
        nvil.baseline.net.bias.fill_(-2.0)
    # the moments of 7 earlier batches, as a checkpoint restores them
    nvil.moments.load_state_dict({"mean": torch.tensor(-3.0), "var": torch.tensor(16.0), "count": torch.tensor(7)})
    guide_params = list(guide.parameters())
    grads = {}
    for mode in ("eval", "train"):
        getattr(nvil, mode)()
        pyro.set_rng_seed(11)
        loss = nvil(x)
        grads[mode] = torch.autograd.grad(loss, guide_params + [nvil.baseline.net.bias])
        grads[mode + "_loss"] = loss.detach()
    assert all(torch.allclose(a, b) for a, b in zip(grads["eval"], grads["train"]))
    assert int(nvil.moments.count) == 8 and nvil.moments.mean.item() != -3.0  # updated after use
    # d/d(bias) sum_b (l_b + 2 + 3)^2 = -2 sum_b (l_b + 5), and sum_b l_b = -loss
    expected = -2 * (-grads["eval_loss"] + 5 * x.shape[0])
    assert torch.allclose(grads["eval"][-1], expected.reshape(1), rtol=1e-5)
    # the guide's gradient: minus that of sum_b (l - b - c) / max(1, sd) log q = (l + 2 + 3) / 4 log q,
    # on the same draws (a baseline or mean of the wrong sign is still unbiased: only this value tells)
    from pyro_vae.traces import draw_particles

    pyro.set_rng_seed(11)
    particles = draw_particles(model, guide, x, 1, nvil.nesting(x))
    centred = (particles.log_weights().detach() + 2.0 + 3.0) / 4.0
    expected = torch.autograd.grad(-(centred * particles.log_guide()).mean(0).sum(), guide_params)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads["eval"], expected))


def test_tracegraph_elbo_baseline_average_moves_in_training_only():
    """``tracegraph_elbo``'s decaying average of the ELBO is updated by a
    training step and left as it is by an evaluation."""
    model, guide = _bernoulli_pair()
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    objective = registry.OBJECTIVES.build("tracegraph_elbo", {"baseline": "decaying_avg"})(model, guide)
    objective.prepare(x)
    objective.train()
    objective(x)
    mean, count = objective.average.mean.clone(), int(objective.average.count)
    assert count == 1
    objective.eval()
    objective(x)
    assert torch.equal(objective.average.mean, mean) and int(objective.average.count) == count
    objective.train()
    objective(x)
    assert int(objective.average.count) == 2 and not torch.equal(objective.average.mean, mean)


def test_relaxed_estimators_perturb_the_logits_with_logistic_noise():
    """``alpha + log u - log(1 - u)`` is logistic around ``alpha``, so its
    sign is the guide's Bernoulli draw: P(alpha + L > 0) = sigmoid(alpha),
    checked per latent and datapoint over 20,000 particles within 5
    standard errors (noise of the wrong sign leans every draw towards 0)."""
    from pyro_vae.objectives.binary import bernoulli_logits

    model, guide = _bernoulli_pair()
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    objective = registry.OBJECTIVES.build("straight_through", {"num_particles": 20000})(model, guide)
    objective.prepare(x)
    pyro.set_rng_seed(0)
    guide_trace, perturbed = objective._samples(x)
    p = torch.sigmoid(bernoulli_logits(guide_trace, 5, "straight_through")["z"].detach()).double()
    frequency = (perturbed["z"] > 0).double().mean(0)
    assert ((frequency - p).abs() < 5 * (p * (1 - p) / 20000).sqrt()).all()


def test_relaxed_loss_is_the_relaxed_likelihood_minus_the_analytic_kl():
    """``relaxed``: the loss is -sum_b mean_k [log p(x | sigmoid((alpha + L) / tau)) - KL(q || p)],
    the KL the closed form between the guide's and the prior's Bernoulli latents."""
    from pyro_vae.traces import replay_particles

    model, guide = _bernoulli_pair()
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    objective = registry.OBJECTIVES.build("relaxed", {"num_particles": 3, "temperature": 0.5})(model, guide)
    objective.prepare(x)
    pyro.set_rng_seed(0)
    loss = objective(x)
    pyro.set_rng_seed(0)
    guide_trace, perturbed = objective._samples(x)
    with torch.no_grad():
        relaxed = replay_particles(model, guide_trace, x, {"z": torch.sigmoid(perturbed["z"] / 0.5)}, 1)
        q_logits = guide_trace.nodes["z"]["fn"].base_dist.logits
        prior_logits = model.prior(5).base_dist.logits
        kl = kl_divergence(dist.Bernoulli(logits=q_logits), dist.Bernoulli(logits=prior_logits)).sum(-1)
        expected = -(relaxed.log_likelihood() - kl).mean(0).sum()
    assert kl.min() > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_estimators_needing_one_bernoulli_site_refuse_two():
    from pyro_vae.errors import ConfigError

    model, guide = _bernoulli_pair()
    x = torch.bernoulli(torch.full((5, 6), 0.4))

    def two_site_guide(x, batch_size=None):
        guide(x)
        with pyro.plate("data_again", x.shape[0]):
            pyro.sample("w", dist.Bernoulli(logits=torch.zeros(x.shape[0], 2)).to_event(1))

    with pytest.raises(ConfigError, match="one latent site"):
        registry.OBJECTIVES.build("disarm", {})(model, two_site_guide)(x)
