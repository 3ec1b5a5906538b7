"""The catalogue's parts compute what their docstrings say."""
import pyro.poutine as poutine
import torch
from torch.nn.functional import softplus

from pyro_vae import registry


def test_normal_guide_scale_is_softplus_plus_a_small_floor():
    """sigma = softplus(s) + 1e-4: down to ~1e-4 for very negative s."""
    guide = registry.GUIDES.build("normal", {"hidden": [3]}, event_shape=(4,), latent_dim=2)
    x = torch.randn(5, 4)
    with torch.no_grad():
        guide.encoder[-1].bias[2:] = torch.tensor([-30.0, 1.0])
        raw = guide.encoder(x)[:, 2:]
        scale = poutine.trace(guide).get_trace(x).nodes["z"]["fn"].base_dist.scale
    assert torch.allclose(scale, softplus(raw) + 1e-4)
    assert (scale[:, 0] < 2e-4).all()


def test_bernoulli_prior_fixed_or_learned():
    fixed = registry.PRIORS.build("bernoulli", {}, latent_dim=3)
    learned = registry.PRIORS.build("bernoulli", {"learned": True}, latent_dim=3)
    assert list(fixed.parameters()) == [] and [p.shape for p in learned.parameters()] == [(3,)]
    p = fixed(5)
    assert p.batch_shape == (5,) and p.event_shape == (3,)
    assert torch.allclose(p.log_prob(torch.ones(5, 3)), torch.full((5,), 3 * torch.log(torch.tensor(0.5))))


def test_linear_decoder_is_one_affine_map():
    prior = registry.PRIORS.build("bernoulli", {}, latent_dim=200)
    model = registry.MODELS.build("linear", {}, prior=prior, event_shape=(1, 28, 28))
    layers = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 1 and layers[0].weight.shape == (784, 200)
    x = torch.bernoulli(torch.full((3, 1, 28, 28), 0.2))
    trace = poutine.trace(model).get_trace(x)
    z = trace.nodes["z"]["value"]
    assert torch.allclose(trace.nodes["x"]["fn"].logits, layers[0](z))


def test_bernoulli_kl_is_finite_and_exact_for_saturated_logits():
    """KL(Ber(sigmoid(a)) || Ber(sigmoid(b))) against float64 sums, including a
    prior logit of 30 whose float32 probability rounds to 1 (torch's own
    formula gives inf there)."""
    import pyro.distributions as dist
    from torch.distributions import kl_divergence

    a = torch.tensor([0.3, -2.0, 5.0, 1.0])
    b = torch.tensor([-1.0, 0.5, 30.0, -30.0])
    kl = kl_divergence(dist.Bernoulli(logits=a), dist.Bernoulli(logits=b))
    q, p = torch.sigmoid(a.double()), torch.sigmoid(b.double())
    lp1, lp0 = torch.nn.functional.logsigmoid(b.double()), torch.nn.functional.logsigmoid(-b.double())
    expected = q * (q.log() - lp1) + (1 - q) * ((1 - q).log() - lp0)
    assert torch.isfinite(kl).all()
    assert torch.allclose(kl.double(), expected, rtol=1e-4)


def test_parts_reach_their_networks_without_param_messages():
    """A PartModule hands its plain nn.Module children over as they are: no
    per-parameter `param` message each step; PyroModule children (the prior,
    with its learned logits) and PyroSample attributes keep Pyro's behaviour."""
    import pyro.distributions as dist
    from pyro.nn import PyroSample

    from pyro_vae.nn import PartModule

    prior = registry.PRIORS.build("bernoulli", {"learned": True}, latent_dim=2)
    model = registry.MODELS.build("mlp", {"latent_dim": 2, "hidden": [3]}, prior=prior, event_shape=(4,))
    trace = poutine.trace(model).get_trace(torch.ones(5, 4))
    params = [name for name, site in trace.nodes.items() if site["type"] == "param"]
    assert params == ["prior.logits"]  # the decoder's six tensors send no message
    assert model.decoder is model._modules["decoder"]

    class Scaled(PartModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(1, 1)
            self.scale = PyroSample(dist.LogNormal(0.0, 1.0))

        def forward(self):
            return self.net(torch.ones(1)) * self.scale

    scaled = Scaled()
    trace = poutine.trace(scaled).get_trace()
    assert [name for name, site in trace.nodes.items() if site["type"] == "sample"] == ["scale"]
