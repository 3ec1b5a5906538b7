"""Objectives and KL terms against exact answers."""
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


@pytest.mark.parametrize("name", ["trace_elbo", "meanfield_elbo"])
def test_objectives_estimate_the_exact_elbo(name):
    """-loss / B over many particles -> mean of log p(x) - KL(q || p(z|x))."""
    model = LinearGaussianModel()
    guide = MeanFieldGuide(model)
    x = model.sample_data(20)
    objective = registry.OBJECTIVES.build(name, {"num_particles": 20_000})
    loss = objective(model, guide)(x)
    assert -loss.item() / 20 == pytest.approx(guide.exact_elbo(x).mean().item(), abs=0.03)


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


def test_losses_are_differentiable_modules():
    registry.load_catalogue()
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=2)
    model = registry.MODELS.build("gaussian", {"latent_dim": 2, "hidden": [8]}, prior=prior, event_shape=(1, 4, 4))
    guide = registry.GUIDES.build("normal", {"hidden": [8]}, event_shape=(1, 4, 4), latent_dim=2)
    loss_fn = registry.OBJECTIVES.build("trace_elbo", {"num_particles": 3})(model, guide)
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.5))
    loss_fn(x).backward()
    grads = [p.grad for p in loss_fn.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert len(pyro.get_param_store()) == 0  # parameters live in the modules
