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
