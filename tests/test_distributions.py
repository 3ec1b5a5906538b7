import math

import pyro.distributions as dist
import pytest
import torch

from pyro_vae.distributions import BernoulliVector, bernoulli_log_prob


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


def extreme_logits(dim):
    """57 rows of logits: 50 random (sd 8), then each of 0, +-100, +-1e30, +-20 across the row."""
    return torch.cat([torch.randn(50, dim) * 8,
                      torch.tensor([0.0, 100.0, -100.0, 1e30, -1e30, 20.0, -20.0]).repeat_interleave(dim).reshape(7, dim)])


def assert_float32_rounding_of_float64(actual, logits, value):
    """``actual`` is sum_d [x_d l_d - softplus(l_d)] computed in float64, to float32 rounding."""
    exact = (value.double() * logits.double() - torch.nn.functional.softplus(logits.double())).sum(-1)
    assert torch.all((actual.double() - exact).abs() <= 1e-6 * exact.abs().clamp(min=1.0) * logits.shape[-1] ** 0.5)


@pytest.mark.parametrize("dim", [784, 787, 4096, 1])  # groups of 112, of 1 (787 is prime), of 64, of 1
def test_bernoulli_log_prob_matches_float64_on_extreme_logits(dim):
    """sum_d [x_d l_d - softplus(l_d)], the softplus by grouped products,
    against float64: error at float32 rounding, for logits from -1e30 to
    1e30 and exactly 0, at x = 0 (the log-normaliser alone) and x = 1
    broadcast over the logits, and at random x of the logits' shape (torch's
    fused kernel)."""
    logits = extreme_logits(dim)
    for value in (torch.zeros(dim), torch.ones(dim), torch.bernoulli(torch.full(logits.shape, 0.5))):  # [D]; [B, D]
        actual = bernoulli_log_prob(logits, value)
        assert actual.dtype == torch.float32 and actual.shape == (57,)
        assert_float32_rounding_of_float64(actual, logits, value)
    assert bernoulli_log_prob(torch.tensor([[1e30, -1e30]]), torch.tensor([1.0, 0.0])).item() == 0.0
    assert bernoulli_log_prob(torch.tensor([[1e30, -1e30]]), torch.tensor([0.0, 0.0])).item() == -torch.tensor(1e30).item()
    assert torch.isnan(bernoulli_log_prob(torch.tensor([[math.nan, 0.0]]), torch.zeros(2))).all()
    # a huge logit beside a small one, each pixel's terms combined before the sum: 0 + log sigmoid(-1)
    # (two samples of the logits for one datapoint: the grouped path, not torch's fused kernel)
    beside = bernoulli_log_prob(torch.tensor([[[1e30, 1.0]], [[1.0, 1e30]]]), torch.tensor([[1.0, 0.0]]))
    assert beside[0].item() == pytest.approx(-math.log1p(math.e), rel=1e-6) and beside[1].item() == -torch.tensor(1e30).item()


def test_compiled_bernoulli_log_prob_matches_float64_on_extreme_logits():
    """Compiled (Inductor: the grouped path's out-of-place form), against
    float64 for samples of logits ``[K, 1, D]`` from -1e30 to 1e30 and
    exactly 0 (a group of 112 factors of 1/2: 2^-112, inside float32's
    normal range), at x = 0, 1 and random."""
    dim = 784
    logits = extreme_logits(dim)
    compiled = torch.compile(bernoulli_log_prob, fullgraph=True)
    for value in (torch.zeros(1, dim), torch.ones(1, dim), torch.bernoulli(torch.full((1, dim), 0.5))):
        assert_float32_rounding_of_float64(compiled(logits.unsqueeze(1), value).squeeze(1), logits, value)


@pytest.mark.parametrize("logit_shape,value_shape", [((2, 6), (2, 6)), ((1, 2, 6), (2, 6)), ((3, 2, 6), (2, 6)),
                                                     ((2, 6), (3, 2, 6))])
def test_bernoulli_log_prob_gradient_is_the_residual_including_at_zero(logit_shape, value_shape):
    """d/dl = x - sigmoid(l) (1/2 from x at l = 0, where |l| has no
    derivative), d/dx = l, whichever of logits and data has more batch dims."""
    logits = torch.randn(logit_shape, dtype=torch.float64).index_fill_(-1, torch.tensor([0]), 0.0).requires_grad_()
    value = torch.bernoulli(torch.full(value_shape, 0.5, dtype=torch.float64)).requires_grad_()
    (bernoulli_log_prob(logits, value) * 2.0).sum().backward()
    expected = dist.Bernoulli(logits=logits).log_prob(value.detach()).sum(-1)
    assert torch.allclose(bernoulli_log_prob(logits, value), expected)
    residual = (value.detach() - torch.sigmoid(logits.detach())).sum_to_size(logit_shape)
    assert torch.allclose(logits.grad, 2.0 * residual)
    assert torch.autograd.gradcheck(bernoulli_log_prob, (logits, value))
    assert torch.autograd.gradgradcheck(bernoulli_log_prob, (logits, value))
    as_bytes = bernoulli_log_prob(logits.detach(), value.detach().to(torch.uint8))
    assert torch.equal(as_bytes, bernoulli_log_prob(logits.detach(), value.detach()))


def test_bernoulli_log_prob_keeps_pyro_provenance():
    """TraceGraph_ELBO tracks which latents a cost depends on with
    provenance tensors; the log-density must keep the provenance and the gradient."""
    from pyro.ops.provenance import get_provenance, track_provenance

    logits = torch.randn(4, 10, requires_grad=True)
    value = torch.bernoulli(torch.full((4, 10), 0.5))
    total = bernoulli_log_prob(track_provenance(logits * 1.0, frozenset({"z"})), value)
    assert get_provenance(total) == frozenset({"z"})
    total.sum().backward()
    assert torch.allclose(logits.grad, value - torch.sigmoid(logits.detach()))
