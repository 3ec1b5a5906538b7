"""Every registered prior x guide x likelihood: the combinations meant to work
take a training step and an evaluation with finite numbers; the others are
refused when the experiment is built, with an error naming both parts."""
import math

import numpy as np
import pytest
import torch

from conftest import requires_cuda
from pyro_vae import registry
from pyro_vae.config import config_from_dict
from pyro_vae.errors import ConfigError
from pyro_vae.evaluate import evaluate, mean_elbo
from pyro_vae.experiment import Experiment
from pyro_vae.plots import latent_codes

SMALL = {"standard_normal": {}, "learned_normal": {}, "mog": {"components": 3}, "vamp": {"pseudo_inputs": 5},
         "gmm_ex_post": {"components": 2}, "bernoulli": {"learned": True}}
GUIDE_OPTIONS = {"normal": {}, "lowrank_normal": {"rank": 2}, "iaf": {"context_dim": 8, "flow_hidden": [8]},
                 "delta": {}, "bernoulli": {}}
CONTINUOUS_GUIDES = ("normal", "lowrank_normal", "iaf")


def refusal(prior: str, guide: str):
    """The message expected when the pair cannot work, else None."""
    if prior == "vamp" and guide == "bernoulli":
        return r"prior 'vamp' needs a guide whose q\(z\|x\) is a density over continuous latents; .* is discrete"
    if prior == "vamp" and guide == "iaf":
        return r"prior 'vamp' needs a guide whose q\(z\|x\) broadcasts"
    if prior == "vamp" and guide == "delta":
        return r"prior 'vamp' needs a guide whose q\(z\|x\) is a density over continuous latents; .* is a point mass"
    if (prior == "bernoulli") != (guide == "bernoulli"):
        return rf"guide '{guide}' draws latent 'z' from a .*, but prior '{prior}' is a"
    if guide == "delta":  # with the default eval.iw_samples > 0
        return r"guide 'delta' is a point estimate at latent 'z' .* eval.iw_samples = \d+"
    return None


TEXT_GUIDES = {"lstm"}  # sentences, not images: tests/test_text.py


def test_the_catalogue_is_what_this_test_covers(tiny_raw):
    """Every prior and image guide is covered below; a text guide on images is
    refused at build time, naming what it needs from the data."""
    registry.load_catalogue()
    assert set(registry.PRIORS.names()) == set(SMALL)
    assert set(registry.GUIDES.names()) == set(GUIDE_OPTIONS) | TEXT_GUIDES
    for guide in TEXT_GUIDES:
        tiny_raw["guide"] = {"name": guide}
        with pytest.raises(ConfigError, match=rf"guide '{guide}' needs vocab_size, pad_id from the data"):
            Experiment.build(config_from_dict(tiny_raw))


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
@pytest.mark.parametrize("guide", list(GUIDE_OPTIONS))
@pytest.mark.parametrize("prior", list(SMALL))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_every_combination_trains_and_evaluates_or_is_refused(device, prior, guide, likelihood, tiny_raw):
    tiny_raw["train"]["device"] = device
    step_and_evaluate_or_refuse(prior, guide, likelihood, tiny_raw)


def step_and_evaluate_or_refuse(prior: str, guide: str, likelihood: str, tiny_raw: dict) -> None:
    """One training step and an IS evaluation of ``prior`` x ``guide`` x
    ``likelihood`` on ``tiny_raw``'s device, with finite numbers and
    ELBO <= log-likelihood; or the refusal :func:`refusal` names."""
    tiny_raw["prior"] = {"name": prior, **SMALL[prior]}
    tiny_raw["guide"] = {"name": guide, "hidden": [16], **GUIDE_OPTIONS[guide]}
    tiny_raw["model"] = {"name": "mlp", "latent_dim": 4, "hidden": [16], "likelihood": likelihood}
    tiny_raw["data"]["binarization"] = "dynamic" if likelihood == "bernoulli" else "dequantize"
    tiny_raw["train"]["limit"] = 40
    expected = refusal(prior, guide)
    if expected:
        with pytest.raises(ConfigError, match=expected):
            Experiment.build(config_from_dict(tiny_raw))
        return
    if guide == "delta":  # a point estimate trains without the IS evaluation
        tiny_raw["eval"] = {"iw_samples": 0}
    experiment = Experiment.build(config_from_dict(tiny_raw))
    objective = experiment.objective
    assert all(p.device.type == tiny_raw["train"]["device"] for p in objective.parameters())
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3)
    loss = objective.step(experiment.data["train"].batch(slice(0, 20)), optimizer)
    assert math.isfinite(loss.item())
    if prior == "gmm_ex_post":  # evaluated with the mixture fitted to the codes
        experiment.model.prior.fit_codes(latent_codes(experiment.guide, experiment.data["train"].batches(20)))
        assert experiment.model.prior.fitted
    if guide == "delta":
        assert math.isfinite(mean_elbo(experiment.model, experiment.guide, experiment.data["test"].head(10).batches(10)))
        return
    result = evaluate(experiment.model, experiment.guide, experiment.data["test"].head(10).batches(10), 30,
                      progress=False)
    assert np.isfinite(result.log_likelihood).all() and np.isfinite(result.elbo).all()
    assert (result.elbo <= result.log_likelihood + 1e-4).all()
