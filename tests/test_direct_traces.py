"""The trace core's direct route: the traces of a LatentVariableModel and a
DistributionGuide built from their distributions are Pyro's own, site by
site, draw by draw, and so are every objective's loss and gradients."""
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.nn import PyroSample

from pyro_vae import registry
from pyro_vae.config import config_from_dict
from pyro_vae.contract import DistributionGuide, LatentVariableModel
from pyro_vae.experiment import build_model_and_guide
from pyro_vae.traces import builds_traces_directly, guide_and_model_traces, sample_sites
from test_text import build as build_sentence_vae, small_dataset

IMAGE = {"event_shape": (1, 4, 4)}
IMAGE_PAIRS = [  # (prior, guide, likelihood): every image guide with a density, and each prior family
    ("standard_normal", "normal", "bernoulli"),
    ("standard_normal", "normal", "continuous_bernoulli"),
    ("learned_normal", "normal", "gaussian"),
    ("mog", "lowrank_normal", "bernoulli"),
    ("vamp", "normal", "bernoulli"),
    ("standard_normal", "iaf", "bernoulli"),
    ("bernoulli", "bernoulli", "bernoulli"),
    ("standard_normal", "delta", "bernoulli"),
]


def image_vae(prior, guide, likelihood, direct=True, latent_dim=3):
    raw = {"data": {"name": "mnist"},
           "model": {"name": "mlp", "latent_dim": latent_dim, "hidden": [8], "likelihood": likelihood},
           "prior": {"name": prior}, "guide": {"name": guide, "hidden": [8]}, "objective": {"name": "meanfield_elbo"},
           "train": {"direct_traces": direct}}
    torch.manual_seed(0)
    return build_model_and_guide(config_from_dict(raw), IMAGE)


def image_batch(likelihood):
    torch.manual_seed(1)
    pixels = torch.rand(5, *IMAGE["event_shape"])
    return pixels.round() if likelihood == "bernoulli" else pixels


def both_routes(model, guide, x, num_particles):
    """(Pyro's traces, the direct ones), each from the same RNG state."""
    assert builds_traces_directly(model, guide)
    pyro.set_rng_seed(7)
    model.direct_traces = False
    pyro_traces = guide_and_model_traces(model, guide, x, num_particles)
    model.direct_traces = True
    pyro.set_rng_seed(7)
    return pyro_traces, guide_and_model_traces(model, guide, x, num_particles)


def assert_same_sites(expected: poutine.Trace, actual: poutine.Trace):
    expected_sites, actual_sites = dict(sample_sites(expected)), dict(sample_sites(actual))
    assert list(expected_sites) == list(actual_sites)
    for name, site in expected_sites.items():
        other = actual_sites[name]
        assert type(other["fn"]) is type(site["fn"]), name
        assert other["fn"].batch_shape == site["fn"].batch_shape, name
        assert other["fn"].event_shape == site["fn"].event_shape, name
        assert other["fn"].has_rsample == site["fn"].has_rsample, name
        assert other["is_observed"] == site["is_observed"] and other["mask"] is site["mask"], name
        assert other["scale"] == site["scale"], name
        assert other["cond_indep_stack"] == site["cond_indep_stack"], name
        assert torch.equal(other["value"], site["value"]), name
        assert torch.allclose(other["fn"].log_prob(other["value"]), site["fn"].log_prob(site["value"])), name


@pytest.mark.parametrize("num_particles", [None, 1, 3])
@pytest.mark.parametrize("prior,guide,likelihood", IMAGE_PAIRS)
def test_direct_traces_are_pyros_on_images(prior, guide, likelihood, num_particles):
    model, guide_module = image_vae(prior, guide, likelihood)
    (pyro_guide, pyro_model), (guide_trace, model_trace) = both_routes(model, guide_module, image_batch(likelihood),
                                                                       num_particles)
    assert_same_sites(pyro_guide, guide_trace)
    assert_same_sites(pyro_model, model_trace)


class ZIgnoringModel(LatentVariableModel):
    """p(x | z) = Bernoulli(sigmoid(l)), the same for every z: its batch shape is [B] whatever z's."""

    def __init__(self):
        super().__init__()
        self.prior = registry.PRIORS.build("standard_normal", {}, latent_dim=3)
        self.logits = torch.nn.Parameter(torch.zeros(16))

    def observation(self, z, x):
        return pyro.distributions.Bernoulli(logits=self.logits.expand(z.shape[-2], 16)).to_event(1)

    def observed(self, x):
        return x.reshape(x.shape[0], -1)


@pytest.mark.parametrize("num_particles", [None, 1, 3])
def test_direct_traces_broadcast_a_likelihood_that_ignores_z_over_the_particles(num_particles):
    _, guide = image_vae("standard_normal", "normal", "bernoulli")
    (pyro_guide, pyro_model), (guide_trace, model_trace) = both_routes(ZIgnoringModel(), guide,
                                                                       image_batch("bernoulli"), num_particles)
    assert_same_sites(pyro_guide, guide_trace)
    assert_same_sites(pyro_model, model_trace)


@pytest.mark.parametrize("num_particles", [None, 2])
def test_direct_traces_are_pyros_on_sentences_with_padding_and_word_dropout(num_particles):
    data, model, guide = build_sentence_vae(word_dropout=0.5)
    model.train()  # word dropout draws after the guide's sample: the order of draws must be Pyro's
    x = data["train"].batch(torch.arange(4))
    assert (x == model.pad_id).any()
    (pyro_guide, pyro_model), (guide_trace, model_trace) = both_routes(model, guide, x, num_particles)
    assert_same_sites(pyro_guide, guide_trace)
    assert_same_sites(pyro_model, model_trace)


@pytest.mark.parametrize("objective,options,latent", [
    ("meanfield_elbo", {}, "continuous"), ("meanfield_elbo", {"free_bits": 0.5, "num_particles": 2}, "continuous"),
    ("iwae", {"num_particles": 4}, "continuous"), ("beta", {"beta": 4.0}, "continuous"), ("beta_tc", {}, "continuous"),
    ("meanfield_elbo", {}, "binary"), ("nvil", {}, "binary"), ("vimco", {"num_particles": 3}, "binary")])
def test_every_objective_gets_the_same_loss_and_gradients(objective, options, latent):
    """The route is invisible to the objectives: on the same draws, the same
    loss and the same gradient for every parameter."""
    x = image_batch("bernoulli")
    results = []
    for direct in (False, True):
        pair = ("mog", "normal") if latent == "continuous" else ("bernoulli", "bernoulli")
        model, guide = image_vae(*pair, "bernoulli", direct=direct)
        loss_module = registry.OBJECTIVES.build(objective, options)(model, guide)
        pyro.set_rng_seed(3)
        loss = loss_module(x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in loss_module.named_parameters()
                                        if p.grad is not None}))
    (pyro_loss, pyro_grads), (loss, grads) = results
    assert torch.allclose(loss, pyro_loss, rtol=1e-6, atol=1e-5)
    assert pyro_grads.keys() == grads.keys() and len(grads) > 0
    for name, grad in pyro_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-6), name


def test_pyro_runs_the_programs_wherever_the_direct_route_would_differ():
    """A handler around the call, a forward of the part's own, or
    ``direct_traces = false``: Pyro traces the program (its traces hold the
    data plate's subsample site, which the direct route leaves out)."""
    model, guide = image_vae("standard_normal", "normal", "bernoulli")
    x = image_batch("bernoulli")

    def traced_by_pyro(m, g):
        return "data" in guide_and_model_traces(m, g, x)[0].nodes

    assert not traced_by_pyro(model, guide)
    with poutine.scale(scale=2.0):
        assert traced_by_pyro(model, guide)
        assert guide_and_model_traces(model, guide, x)[1].nodes["x"]["scale"] == 2.0

    class OwnForward(type(guide)):
        def forward(self, x, batch_size=None):
            return super().forward(x, batch_size)

    guide.__class__ = OwnForward
    assert traced_by_pyro(model, guide)
    guide.__class__ = OwnForward.__mro__[1]
    hook = guide.register_forward_pre_hook(lambda module, args: None)
    assert traced_by_pyro(model, guide)
    hook.remove()
    assert not traced_by_pyro(model, guide)
    model.direct_traces = False
    assert traced_by_pyro(model, guide)


NOISE = pyro.distributions.LogNormal(0.0, 1.0).expand([1]).to_event(1)


class NoisyModel(ZIgnoringModel):
    """A likelihood that makes a sample site of its own: a PyroSample
    attribute (``noise``), or ``pyro.sample`` called in ``observation``."""

    def __init__(self, explicit: bool):
        super().__init__()
        self.explicit = explicit
        if not explicit:
            self.noise = PyroSample(NOISE)

    def observation(self, z, x):
        noise = pyro.sample("noise", NOISE) if self.explicit else self.noise  # [*particles, B, 1] in the plates
        return pyro.distributions.Bernoulli(logits=noise * self.logits.expand(z.shape[-2], 16)).to_event(1)


@pytest.mark.parametrize("explicit", [False, True])
def test_a_part_with_sites_of_its_own_is_traced_by_pyro(explicit):
    _, guide = image_vae("standard_normal", "normal", "bernoulli")
    model = NoisyModel(explicit)
    assert builds_traces_directly(model, guide)  # the classes allow it; the sites found on the first call do not
    _, model_trace = guide_and_model_traces(model, guide, image_batch("bernoulli"), 3)
    assert [name for name, _ in sample_sites(model_trace)] == ["z", "noise", "x"]


def test_the_one_site_verdict_is_kept_per_pair_and_a_pickled_or_copied_guide_checks_again():
    """The verdict lives on the guide for its model; torch.save and deepcopy
    of a guide that has one work, and the copy checks its own pair."""
    import copy
    import io

    model, guide = image_vae("standard_normal", "normal", "bernoulli")
    x = image_batch("bernoulli")
    guide_and_model_traces(model, guide, x, 2)
    torch.save(guide, io.BytesIO())  # no weak reference in what is pickled
    model_copy, guide_copy = copy.deepcopy(model), copy.deepcopy(guide)
    assert guide_copy.__dict__.get("_keeps_one_latent_site") is None
    noisy = NoisyModel(explicit=True)  # the same guide with another model: checked again, and not kept by the first's
    _, model_trace = guide_and_model_traces(noisy, guide, x, 2)
    assert [name for name, _ in sample_sites(model_trace)] == ["z", "noise", "x"]
    _, model_trace = guide_and_model_traces(model_copy, guide_copy, x, 2)
    assert [name for name, _ in sample_sites(model_trace)] == ["z", "x"]


def test_train_direct_traces_reaches_the_model():
    for direct in (True, False):
        model, guide = image_vae("standard_normal", "normal", "bernoulli", direct=direct)
        assert isinstance(model, LatentVariableModel) and isinstance(guide, DistributionGuide)
        assert builds_traces_directly(model, guide) is direct


def test_a_guide_without_to_event_gets_pyros_plate_error_on_both_routes():
    """A latent whose dimensions were left in the batch shape clashes with the
    data plate: the same ValueError on both routes, not a failed expand.
    (Two latents, so the first two datapoints, on which the pair's sites are
    checked once, happen to fit the plate and the direct route goes on.)"""
    model, guide = image_vae("standard_normal", "normal", "bernoulli", latent_dim=2)

    class BatchShapedGuide(type(guide)):
        def distribution(self, x):
            return super().distribution(x).base_dist  # Normal of batch shape [B, 3]

    guide.__class__ = BatchShapedGuide
    for direct in (True, False):
        model.direct_traces = direct
        with pytest.raises(ValueError, match=r"Shape mismatch inside plate\('data'\)"):
            guide_and_model_traces(model, guide, image_batch("bernoulli")[:4], 2)
