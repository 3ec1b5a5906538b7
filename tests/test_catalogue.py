"""The catalogue's parts compute what their docstrings say."""
import math

import numpy as np
import pyro.poutine as poutine
import pytest
import torch
from torch.nn.functional import softplus

from pyro_vae import registry
from pyro_vae.errors import ConfigError


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


def test_mixture_prior_log_density_against_a_direct_computation():
    """log p(z) = log sum_c pi_c prod_d N(z_d; m_cd, s_cd), computed term by term."""
    import math

    prior = registry.PRIORS.build("mog", {"components": 3}, latent_dim=2)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.3, -1.0, 2.0]))
        prior.raw_scales.copy_(torch.tensor([[0.1, -0.5], [1.0, 0.0], [-2.0, 0.7]]))
    z = torch.randn(4, 2) * 2
    pi = torch.softmax(prior.logits, 0)
    s = softplus(prior.raw_scales)
    total = 0.0
    for c in range(3):
        density = torch.ones(4)
        for d in range(2):
            u = (z[:, d] - prior.locs[c, d]) / s[c, d]
            density = density * torch.exp(-u**2 / 2) / (s[c, d] * math.sqrt(2 * math.pi))
        total = total + pi[c] * density
    assert torch.allclose(prior(4).log_prob(z), total.log(), atol=1e-5)


def test_learned_normal_prior_starts_standard_and_learns():
    prior = registry.PRIORS.build("learned_normal", {}, latent_dim=3)
    z = torch.randn(5, 3)
    assert torch.allclose(prior(5).log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1), atol=1e-6)
    prior(5).log_prob(z).sum().backward()
    assert prior.loc.grad.abs().sum() > 0 and prior.raw_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("prior,guide", [
    ({"name": "learned_normal"}, {"name": "normal", "hidden": [64]}),
    ({"name": "mog", "components": 4}, {"name": "normal", "hidden": [64]}),
    ({"name": "standard_normal"}, {"name": "iaf", "hidden": [64], "context_dim": 16, "flow_hidden": [16]}),
    ({"name": "standard_normal"}, {"name": "lowrank_normal", "hidden": [64], "rank": 2}),
    ({"name": "vamp", "pseudo_inputs": 20}, {"name": "normal", "hidden": [64]}),
])
def test_new_priors_and_guides_train_and_evaluate_with_the_mlp_decoder(prior, guide, tiny_raw, tmp_path):
    """One epoch of meanfield_elbo (a mixture prior or a flow guide has no
    analytic KL: the one-sample estimate stands in); every parameter of the
    prior and the guide moves; the IS evaluation is finite, L_K >= ELBO."""
    from pyro_vae.config import config_from_dict
    from pyro_vae.evaluate import evaluate
    from pyro_vae.experiment import Experiment
    from pyro_vae.rundir import RunDir
    from pyro_vae.train import fit

    tiny_raw["prior"], tiny_raw["guide"] = prior, guide
    tiny_raw["train"].update(limit=300, epochs=1)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    moving = [*experiment.model.prior.parameters(), *experiment.guide.parameters()]
    before = [p.clone() for p in moving]
    history = fit(experiment, RunDir(tmp_path), progress=False)
    assert all(not torch.equal(a, b) for a, b in zip(before, moving))
    result = evaluate(experiment.model, experiment.guide, experiment.data["test"].head(20).batches(10), 50,
                      progress=False)
    assert np.isfinite(result.log_likelihood).all() and math.isfinite(history[-1]["valid_elbo"])
    assert (result.elbo <= result.log_likelihood + 1e-3).all()


def test_iaf_guide_density_is_the_change_of_variables_formula():
    """log q(z | x) = log N(z_0 | mu, sigma) - log |det dz/dz_0|, with the
    Jacobian of the whole flow taken by autograd (not from the transforms'
    own log-determinants); the density of a sample the guide drew (read from
    the flow's cache) equals the density of the same point found by
    inverting the flow; the flow is not the identity."""
    torch.manual_seed(0)
    guide = registry.GUIDES.build("iaf", {"hidden": [16], "context_dim": 8, "flow_hidden": [12], "flows": 3},
                                  event_shape=(6,), latent_dim=4).double()
    x = torch.bernoulli(torch.full((3, 6), 0.4, dtype=torch.float64))
    q = guide.distribution(x)
    z0 = q.base_dist.sample()

    def flow(z):
        for transform in q.transforms:
            z = transform(z)
        return z

    z = flow(z0)
    for b in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(torch.cat([z0[:b], v[None], z0[b + 1:]]))[b], z0[b])
        expected = q.base_dist.log_prob(z0)[b] - torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(q.log_prob(z)[b], expected, atol=1e-8)
    inverted = q.log_prob(z.detach().clone())  # a new tensor: no cache, the flow is inverted
    assert torch.allclose(inverted, q.log_prob(z), atol=1e-6)
    assert (z - z0).abs().max() > 1e-3
    assert q.rsample().shape == (3, 4) and q.has_rsample


def test_iaf_steps_are_triangular_in_the_natural_order_and_two_reversed_steps_connect_every_dimension():
    """One flow step's Jacobian dz_1/dz_0 is lower triangular (output d sees
    the inputs up to d, in the natural order); after two steps with the order
    reversed between them every z_2,d depends on every z_0,d' (no zero in the
    Jacobian; Pyro's default random MADE orders can leave some).  The base
    Gaussian's scale is softplus(s) + 1e-4, down to the floor."""
    for flows in (1, 2):
        torch.manual_seed(0)
        guide = registry.GUIDES.build("iaf", {"hidden": [16], "context_dim": 8, "flow_hidden": [12],
                                              "flows": flows}, event_shape=(6,), latent_dim=4).double()
        magnitude = torch.zeros(4, 4, dtype=torch.float64)  # |dz_T/dz_0| summed over draws (a dead ReLU can zero
        for _ in range(8):                                    # one draw's entry, not the structure's)
            q = guide.distribution(torch.bernoulli(torch.full((1, 6), 0.4, dtype=torch.float64)))

            def flow(v):
                v = v[None]
                for transform in q.transforms:
                    v = transform(v)
                return v[0]

            magnitude += torch.autograd.functional.jacobian(flow, q.base_dist.sample()[0]).abs()
        nonzero = magnitude > 1e-10
        if flows == 1:
            assert torch.equal(nonzero, torch.ones(4, 4, dtype=torch.bool).tril()), magnitude
        else:
            assert nonzero.all(), magnitude
    with torch.no_grad():
        guide.gaussian.weight.zero_()
        guide.gaussian.bias.copy_(torch.tensor([0.0] * 4 + [-40.0, -40.0, 0.0, 2.0]))
    scale = guide.distribution(torch.rand(2, 6, dtype=torch.float64)).base_dist.base_dist.scale
    expected = softplus(torch.tensor([-40.0, -40.0, 0.0, 2.0], dtype=torch.float64)) + 1e-4
    assert torch.allclose(scale, expected.expand(2, 4), rtol=1e-6, atol=0) and scale.min() < 1.0001e-4


def test_lowrank_guide_is_the_gaussian_with_covariance_f_ft_plus_diagonal():
    """Its density against a full-covariance MultivariateNormal built from the
    encoder's outputs by hand."""
    guide = registry.GUIDES.build("lowrank_normal", {"hidden": [8], "rank": 2}, event_shape=(5,), latent_dim=3)
    x = torch.randn(4, 5)
    out = guide.encoder(x)
    loc, diag, factor = out[:, :3], softplus(out[:, 3:6]) + 1e-4, out[:, 6:].reshape(4, 3, 2)
    cov = factor @ factor.transpose(-1, -2) + torch.diag_embed(diag)
    z = torch.randn(4, 3)
    expected = torch.distributions.MultivariateNormal(loc, cov).log_prob(z)
    assert torch.allclose(guide.distribution(x).log_prob(z), expected, atol=1e-5)
    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (4, 3) and trace.nodes["z"]["fn"].has_rsample


def test_vamp_prior_is_the_mean_of_the_guide_at_its_pseudo_inputs():
    """log p(z) = log (1/C) sum_c q(z | u_c), each q(z | u_c) from the guide
    itself, one pseudo-input at a time; the prior's density reaches the
    pseudo-inputs and the guide's encoder; the guide is not a submodule of the
    model (its parameters are not duplicated in the model's state)."""
    import math as _math

    from pyro_vae.config import config_from_dict
    from models.priors import VampPrior
    from pyro_vae.experiment import build_model_and_guide

    raw = {"data": {"name": "mnist"}, "model": {"name": "mlp", "latent_dim": 3, "hidden": [8]},
           "prior": {"name": "vamp", "pseudo_inputs": 4}, "guide": {"name": "normal", "hidden": [8]},
           "objective": {"name": "meanfield_elbo"}}
    model, guide = build_model_and_guide(config_from_dict(raw), {"event_shape": (1, 4, 4)})
    prior = model.prior
    assert prior.guide is guide and not any(k.startswith("prior.guide") for k in model.state_dict())
    with torch.no_grad():  # two pseudo-inputs outside [0, 1], which the guide must see clamped
        prior.pseudo_inputs.copy_(torch.tensor([-1.0, 2.0, 0.5, 1.5]).view(4, 1, 1, 1).expand_as(prior.pseudo_inputs))
    z = torch.randn(5, 3)
    densities = torch.stack([guide.distribution(prior.pseudo_inputs[c:c + 1].clamp(0, 1)).log_prob(z)
                             for c in range(4)])
    expected = torch.logsumexp(densities, 0) - _math.log(4)
    log_p = prior(5).log_prob(z)
    assert torch.allclose(log_p, expected, atol=1e-5)
    log_p.sum().backward()
    assert prior.pseudo_inputs.grad.abs().sum() > 0 and guide.encoder[0].weight.grad.abs().sum() > 0

    raw["guide"] = {"name": "bernoulli", "hidden": [8]}
    with pytest.raises(ConfigError, match=r"prior 'vamp' needs a guide whose q\(z\|x\) is a density over continuous "
                                          r"latents; BernoulliGuide's is discrete"):
        build_model_and_guide(config_from_dict(raw), {"event_shape": (1, 4, 4)})
    with pytest.raises(ConfigError, match=r"prior 'vamp' needs a guide with a distribution\(x\) method.*Module has"):
        VampPrior(latent_dim=3, guide=torch.nn.Module(), event_shape=(1, 4, 4))

    class WordGuide(torch.nn.Module):  # an embedding's guide (lstm) fails on real-valued pseudo-inputs
        def distribution(self, x):
            return torch.nn.Embedding(5, 3)(x)

    with pytest.raises(ConfigError, match=r"prior 'vamp' needs a guide whose q\(z\|x\) broadcasts.*WordGuide's "
                                          r"does not \(Expected tensor for argument #1 'indices'"):
        VampPrior(latent_dim=3, guide=WordGuide(), event_shape=(1, 4, 4))
    raw["guide"] = {"name": "iaf", "hidden": [8]}
    with pytest.raises(ConfigError, match=r"prior 'vamp' needs a guide whose q\(z\|x\) broadcasts.*IAFGuide"):
        build_model_and_guide(config_from_dict(raw), {"event_shape": (1, 4, 4)})


@pytest.mark.parametrize("prior,guide,message", [
    ("bernoulli", "normal", "guide 'normal' draws latent 'z' from a continuous Normal, but prior 'bernoulli' is a "
                            "discrete Bernoulli"),
    ("standard_normal", "bernoulli", "guide 'bernoulli' draws latent 'z' from a discrete Bernoulli, but prior "
                                     "'standard_normal' is a continuous Normal"),
])
def test_a_guide_that_does_not_fit_the_prior_is_refused_naming_both(prior, guide, message, tiny_raw):
    from pyro_vae.config import config_from_dict
    from pyro_vae.experiment import Experiment

    tiny_raw["prior"], tiny_raw["guide"] = {"name": prior}, {"name": guide}
    tiny_raw["train"]["limit"] = 100
    with pytest.raises(ConfigError, match=message):
        Experiment.build(config_from_dict(tiny_raw))


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
def test_each_likelihood_log_density_against_its_formula(likelihood):
    """Bernoulli: sum x l - softplus(l); continuous Bernoulli: the Bernoulli
    term plus log C(l), C(l) = 2 artanh(1 - 2p) / (1 - 2p), p = sigmoid(l)
    (C(0) = 2); Gaussian: sum log N(x; sigmoid(l), s^2)."""
    options = {"latent_dim": 2, "hidden": [4], "likelihood": likelihood}
    if likelihood == "gaussian":
        options["scale"] = 0.3
    model = registry.MODELS.build("mlp", options, prior=registry.PRIORS.build("standard_normal", {}, latent_dim=2),
                                  event_shape=(5,))
    logits = torch.tensor([[0.0, 1.5, -2.0, 0.7, -0.1]], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, 0.25, 0.9, 0.5]], dtype=torch.float64)
    bernoulli_term = (x * logits - softplus(logits)).sum(-1)
    if likelihood == "bernoulli":
        x = x.round()
        expected = (x * logits - softplus(logits)).sum(-1)
    elif likelihood == "continuous_bernoulli":
        p = torch.sigmoid(logits)
        log_c = torch.where(logits == 0, torch.tensor(math.log(2.0), dtype=torch.float64),
                            torch.log(2 * torch.atanh(1 - 2 * p) / (1 - 2 * p)))
        expected = bernoulli_term + log_c.sum(-1)
    else:
        mean = torch.sigmoid(logits)
        expected = (-(x - mean) ** 2 / (2 * 0.3**2) - math.log(0.3) - 0.5 * math.log(2 * math.pi)).sum(-1)
    model = model.double()
    assert torch.allclose(model.pixels(logits).log_prob(x), expected, atol=1e-6)


def test_likelihood_options_are_checked_and_gray_data_train_with_continuous_likelihoods(tiny_raw, tmp_path):
    from pyro_vae.config import config_from_dict
    from pyro_vae.experiment import Experiment
    from pyro_vae.rundir import RunDir
    from pyro_vae.train import fit

    with pytest.raises(ConfigError, match="model.scale and model.learn_scale are options of the gaussian likelihood"):
        registry.MODELS.build("mlp", {"learn_scale": True}, prior=None, event_shape=(4,))
    tiny_raw["data"]["binarization"] = "none"
    tiny_raw["train"].update(limit=200, epochs=1)
    for options in ({"likelihood": "continuous_bernoulli"}, {"likelihood": "gaussian", "learn_scale": True}):
        tiny_raw["model"].update(options)
        experiment = Experiment.build(config_from_dict(tiny_raw))
        history = fit(experiment, RunDir(tmp_path / options["likelihood"]), progress=False)
        assert math.isfinite(history[-1]["valid_elbo"])
    assert experiment.model.log_scale.requires_grad and not torch.all(experiment.model.log_scale == math.log(0.1))

    from pyro_vae.train import evaluate_run

    tiny_raw["data"]["binarization"] = "dequantize"  # (v + u) / 256: bits per dimension are defined
    experiment = Experiment.build(config_from_dict(tiny_raw))
    fit(experiment, RunDir(tmp_path / "dequantized"), progress=False)
    result = evaluate_run(experiment, "test", 20, "auto", 50, 100, progress=False)
    nll, dims = -result.log_likelihood.mean(), 28 * 28
    assert result.extra["bits_per_dim"] == pytest.approx((nll + dims * math.log(256)) / (dims * math.log(2)))
    assert math.isfinite(result.extra["bits_per_dim"]) and result.extra["bits_per_dim"] > 0


@pytest.mark.parametrize("latent_dim", [2, 5])
def test_latent_pictures_scatter_the_codes_and_draw_a_2d_manifold(latent_dim, tiny_raw, tmp_path):
    """After training: the test codes scattered by digit (PCA above 2-D) and,
    for a 2-D latent, the decoded manifold, a 20 x 20 grid of 28 x 28 digits;
    the codes are the guide's means."""
    from PIL import Image

    from pyro_vae.config import config_from_dict
    from pyro_vae.experiment import Experiment
    from pyro_vae.plots import latent_codes
    from pyro_vae.rundir import RunDir
    from pyro_vae.train import fit, save_latent_pictures

    tiny_raw["model"]["latent_dim"] = latent_dim
    tiny_raw["train"]["limit"] = 200
    experiment = Experiment.build(config_from_dict(tiny_raw))
    run = RunDir(tmp_path)
    fit(experiment, run, progress=False)
    save_latent_pictures(run, experiment, {"z": [0.5] * latent_dim})
    assert (tmp_path / "latent_scatter.png").stat().st_size > 5000
    manifold = tmp_path / "manifold.png"
    assert manifold.exists() == (latent_dim == 2)
    if latent_dim == 2:
        assert Image.open(manifold).size == (20 * 29 + 1, 20 * 29 + 1)
    x = experiment.data["test"].batch(slice(0, 7))
    codes = latent_codes(experiment.guide, [x])
    assert torch.allclose(codes, experiment.guide.distribution(x).mean)


def test_diagonal_normal_mixture_matches_the_componentwise_density_at_small_scales():
    """The GEMM expansion of the quadratic forms agrees with torch's
    component-by-component MixtureSameFamily in float64, including at
    scales of 0.01 far from the means (where a float32 expansion loses
    about a nat), over particle-shaped values [K, B, D]; its samples have
    the mixture's mean and second moment."""
    from pyro_vae.distributions import DiagonalNormalMixture

    torch.manual_seed(0)
    logits, loc = torch.randn(7, dtype=torch.float64), 3 * torch.randn(7, 5, dtype=torch.float64)
    scale = torch.empty(7, 5, dtype=torch.float64).uniform_(0.01, 2.0)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1))
    mixture = DiagonalNormalMixture(logits.float(), loc.float(), scale.float()).expand([4])
    z = loc[torch.randint(7, (3, 4))] + 0.05 * torch.randn(3, 4, 5, dtype=torch.float64)
    expected = reference.log_prob(z)
    assert mixture.batch_shape == (4,) and mixture.event_shape == (5,)
    assert torch.allclose(mixture.log_prob(z.float()).double(), expected, rtol=1e-6, atol=1e-3)
    params = [t.float().requires_grad_() for t in (logits, loc, scale, z)]
    reference_grads = torch.autograd.grad(torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=params[0]),
        torch.distributions.Independent(torch.distributions.Normal(params[1], params[2]), 1)).log_prob(params[3]).sum(),
        params)
    grads = torch.autograd.grad(DiagonalNormalMixture(*params[:3]).expand([4]).log_prob(params[3]).sum(), params)
    for got, expected_grad in zip(grads, reference_grads):  # the same gradients for every parameter and z
        assert torch.allclose(got, expected_grad, rtol=1e-4, atol=1e-3 * expected_grad.abs().max())
    samples = mixture.sample((20_000,)).double()
    assert samples.shape == (20_000, 4, 5)
    assert torch.allclose(samples.mean((0, 1)), reference.mean, atol=0.05)
    assert torch.allclose((samples ** 2).mean((0, 1)), reference.variance + reference.mean ** 2, rtol=0.05)


def test_a_part_call_skips_pyros_module_context_only_where_it_does_nothing(monkeypatch):
    """Without Pyro attributes, handlers or validation, a part's call is
    torch's; a PyroSample keeps one value per call, and under validation Pyro
    still refuses a global pyro.param inside a part."""
    import pyro
    import pyro.distributions as dist
    from pyro.nn import PyroModule, PyroSample

    from pyro_vae.nn import PartModule

    entered = []
    pyro_call = PyroModule.__call__
    monkeypatch.setattr(PyroModule, "__call__", lambda self, *a, **k: entered.append(1) or pyro_call(self, *a, **k))
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=2)
    with pyro.validation_enabled(False):
        prior(3)
        assert entered == []
        poutine.trace(prior).get_trace(3)  # under a handler
        assert entered == [1]
    with pyro.validation_enabled(True):
        prior(3)
    assert entered == [1, 1]

    class TwoDraws(PartModule):
        def __init__(self):
            super().__init__()
            self.scale = PyroSample(dist.LogNormal(0.0, 1.0))

        def forward(self):
            return self.scale, self.scale

    with pyro.validation_enabled(False):
        first, second = TwoDraws()()
    assert first is second

    class GlobalParam(PartModule):
        def forward(self):
            return pyro.param("w", torch.ones(1))

    with pyro.validation_enabled(True), pytest.raises(NotImplementedError):
        GlobalParam()()


class _PositivePrior(torch.nn.Module):
    """Exponential(1) in each dimension: a prior whose support is the positive reals."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("rate", torch.ones(latent_dim))

    def forward(self, batch_size: int):
        import pyro.distributions as dist

        return dist.Exponential(self.rate.expand(batch_size, -1)).to_event(1)


def test_a_guide_drawing_outside_the_priors_support_is_refused(monkeypatch):
    """A Normal guide (draws on all the reals) for an Exponential prior (positive reals)
    is refused by Experiment.build, naming both parts, though both are continuous."""
    from pyro_vae.errors import ConfigError
    from pyro_vae.registry import PRIORS

    monkeypatch.setattr(PRIORS, "_entries", dict(PRIORS._entries))  # the registration is undone afterwards
    PRIORS.register("_probe_positive")(_PositivePrior)
    import copy

    from conftest import TINY
    from pyro_vae.config import config_from_dict
    from pyro_vae.experiment import Experiment

    raw = copy.deepcopy(TINY)
    raw["prior"] = {"name": "_probe_positive"}
    with pytest.raises(ConfigError, match="guide 'normal' draws latent 'z' from a continuous Normal, but prior "
                                          "'_probe_positive' is a continuous Exponential"):
        Experiment.build(config_from_dict(raw))
