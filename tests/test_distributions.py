import math

import pyro.distributions as dist
import pytest
import torch

from pyro_vae.distributions import BernoulliVector


@pytest.mark.parametrize("logit_shape,value_shape", [((7, 5, 6), (5, 6)), ((5, 6), (5, 6)), ((2, 5, 6), (1, 5, 6))])
def test_bernoulli_vector_matches_torch(logit_shape, value_shape):
    logits = torch.randn(logit_shape) * 3
    value = torch.bernoulli(torch.full(value_shape, 0.4))
    expected = dist.Bernoulli(logits=logits).to_event(1).log_prob(value)
    actual = BernoulliVector(logits).log_prob(value)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-4)


def test_bernoulli_vector_shapes_mean_expand_and_support():
    d = BernoulliVector(torch.zeros(3, 4))
    assert d.batch_shape == (3,) and d.event_shape == (4,)
    assert torch.allclose(d.mean, torch.full((3, 4), 0.5))
    assert d.expand((2, 3)).batch_shape == (2, 3)
    assert d.sample().shape == (3, 4)
    with pytest.raises(ValueError):
        BernoulliVector(torch.zeros(3, 4), validate_args=True).log_prob(torch.full((3, 4), 0.5))


@pytest.mark.parametrize("dim", [784, 787, 4096, 1])  # groups of 56, of 1 (787 is prime), of 64, of 1
def test_softplus_sum_matches_float64_softplus_on_extreme_logits(dim):
    """sum_d softplus(l_d) by grouped products, against float64: relative
    error at float32 rounding, for logits from -1e30 to 1e30 and exactly 0."""
    from pyro_vae.distributions import softplus_sum

    logits = torch.cat([torch.randn(50, dim) * 8,
                        torch.tensor([0.0, 100.0, -100.0, 1e30, -1e30, 20.0, -20.0]).repeat_interleave(dim).reshape(7, dim)])
    exact = torch.nn.functional.softplus(logits.double()).sum(-1)
    actual = softplus_sum(logits)
    assert actual.dtype == torch.float32 and actual.shape == (57,)
    assert torch.all((actual.double() - exact).abs() <= 1e-6 * exact.abs().clamp(min=1.0) * dim ** 0.5)
    assert softplus_sum(torch.tensor([[math.inf, -math.inf]])).item() == math.inf
    assert torch.isnan(softplus_sum(torch.tensor([[math.nan, 0.0]]))).all()


def test_softplus_sum_gradient_is_the_sigmoid_including_at_zero():
    from pyro_vae.distributions import softplus_sum

    logits = torch.tensor([[0.0, 3.0, -3.0, 50.0, -50.0, 0.5]], requires_grad=True)
    (softplus_sum(logits) * 2.0).sum().backward()
    assert torch.allclose(logits.grad, 2.0 * torch.sigmoid(logits.detach()), atol=1e-7)
    assert logits.grad[0, 0] == 1.0  # sigmoid(0) = 1/2, where |l| has no derivative
    double = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(softplus_sum, double)
    assert torch.autograd.gradgradcheck(softplus_sum, double)


def test_softplus_sum_keeps_pyro_provenance():
    """TraceGraph_ELBO tracks which latents a cost depends on with
    provenance tensors; the sum must keep the provenance and the gradient."""
    from pyro.ops.provenance import get_provenance, track_provenance

    from pyro_vae.distributions import softplus_sum

    logits = torch.randn(4, 10, requires_grad=True)
    total = softplus_sum(track_provenance(logits * 1.0, frozenset({"z"})))
    assert get_provenance(total) == frozenset({"z"})
    total.sum().backward()
    assert torch.allclose(logits.grad, torch.sigmoid(logits.detach()))
