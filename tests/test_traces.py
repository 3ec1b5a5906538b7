"""The trace core on hand-built cases whose answers are known exactly."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from linear_gaussian import LinearGaussianModel, PosteriorGuide
from pyro_vae.distributions import BernoulliVector
from pyro_vae.evaluate import importance_log_likelihood, kl_per_dimension
from pyro_vae.traces import draw_particles, log_mean_exp, per_datapoint, site_log_prob


def test_importance_bound_on_hand_built_weights():
    """L_K = log mean_k w_k: w = [1, 3] gives log 2, per datapoint."""
    log_w = torch.tensor([[0.0, math.log(5.0)], [math.log(3.0), math.log(5.0)]])
    assert torch.allclose(importance_log_likelihood(log_w), torch.tensor([math.log(2.0), math.log(5.0)]))
    assert torch.allclose(log_mean_exp(torch.full((7, 1), -1000.0)), torch.tensor([-1000.0]))  # stable


def _masked_model(mask):
    """Masks both ways: the distribution's .mask() and poutine.mask (the site's "mask")."""

    def model(x, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1).mask(mask))
            with pyro.poutine.mask(mask=mask):
                pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1).mask(mask))

    return model, guide


def test_masked_datapoints_contribute_nothing():
    mask = torch.tensor([True, False, True, False])
    model, guide = _masked_model(mask)
    x = torch.randn(4, 1)
    particles = draw_particles(model, guide, x, num_particles=5, nesting=1)
    log_lik, log_w = particles.log_likelihood(), particles.log_weights()
    assert log_lik.shape == (5, 4)
    assert (log_lik[:, ~mask] == 0).all() and (log_w[:, ~mask] == 0).all()
    assert (log_lik[:, mask] != 0).all()


def test_subsampled_plate_is_per_datapoint_and_unscaled():
    """pyro.plate('data', N, subsample=...) scales sites by N / B for training;
    per-datapoint log-densities must not carry that scale."""
    x_all = torch.randn(10, 3)
    index = torch.tensor([1, 4, 7])

    def model(x, batch_size=None):
        with pyro.plate("data", 10, subsample=index) as i:
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([3, 3]).to_event(1), obs=x_all[i])

    def guide(x, batch_size=None):
        pass

    particles = draw_particles(model, guide, x_all[index], num_particles=1, nesting=1)
    expected = dist.Normal(0.0, 1.0).log_prob(x_all[index]).sum(-1)
    assert torch.allclose(particles.log_likelihood()[0], expected)
    site = particles.model_trace.nodes["x"]
    assert site["scale"] == pytest.approx(10 / 3)  # the scale is there, and ignored
    assert torch.allclose(site_log_prob("x", site, 1)[0], expected)


def test_per_datapoint_sums_every_other_plate():
    """A site inside a second plate is summed over it, kept per datapoint."""

    def model(x, batch_size=None):
        with pyro.plate("data", 3, dim=-2), pyro.plate("pixels", 4, dim=-1):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    trace = pyro.poutine.trace(model).get_trace(torch.ones(3, 4))
    site = trace.nodes["x"]
    values = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(per_datapoint("x", site, values, nesting=2)[0], values.sum(-1))


def test_full_covariance_kl_matches_its_closed_form():
    """KL(q(z|x) || p(z)) for a full-covariance guide against N(0, I): torch
    registers no KL between a MultivariateNormal and an Independent Normal, so
    the one-sample Monte-Carlo fallback is taken; its mean over many draws
    must match the closed form."""
    model = LinearGaussianModel()
    x = model.sample_data(5)
    guide = PosteriorGuide(model)
    q = model.posterior(x)
    closed_form = kl_divergence(q, dist.MultivariateNormal(torch.zeros(3, dtype=x.dtype),
                                                           torch.eye(3, dtype=x.dtype)))
    draws = torch.stack([kl_per_dimension(model, guide, x)["z"][:, 0] for _ in range(4000)])
    assert draws.shape == (4000, 5)
    standard_error = draws.std(0) / math.sqrt(4000)
    assert ((draws.mean(0) - closed_form).abs() < 5 * standard_error).all()
    assert (closed_form > 0.1).all()  # a sign error could not hide in a KL near zero


@pytest.mark.parametrize("make", [
    lambda: dist.Normal(torch.randn(3, 4), torch.rand(3, 4) + 0.5).to_event(1),
    lambda: dist.Normal(torch.randn(4), torch.rand(4) + 0.5).to_event(1),
    lambda: dist.Bernoulli(logits=torch.randn(3, 4)),
    lambda: BernoulliVector(torch.randn(3, 4)),
    lambda: dist.LowRankMultivariateNormal(torch.randn(3, 4), torch.randn(3, 4, 2), torch.rand(3, 4) + 0.5),
    lambda: dist.MixtureSameFamily(dist.Categorical(logits=torch.randn(2)),
                                   dist.Normal(torch.randn(2, 4), torch.ones(2, 4)).to_event(1)),
])
def test_expanded_is_torchs_expand(make):
    """The trace core's expand (new instances by ``object.__new__``, an
    ``Independent`` rebuilt around its expanded base) gives torch's
    ``expand``: its type, shapes, validation flag, draws from the same seed
    and densities."""
    from pyro_vae.traces import _expanded

    fn = make()
    shape = (5, 3) if fn.batch_shape in ((3,), ()) else (5, *fn.batch_shape)
    ours, theirs = _expanded(fn, shape), fn.expand(shape)
    assert type(ours) is type(theirs)
    assert (ours.batch_shape, ours.event_shape) == (theirs.batch_shape, theirs.event_shape) == (shape, fn.event_shape)
    assert ours._validate_args == theirs._validate_args
    torch.manual_seed(1)
    a = ours.sample()
    torch.manual_seed(1)
    assert torch.equal(a, theirs.sample())
    assert torch.allclose(ours.log_prob(a), theirs.log_prob(a))
    assert _expanded(fn, fn.batch_shape) is fn  # already of that shape: itself, no copy
