"""Decoders p(x | z) with Bernoulli pixels, for any prior p(z)::

    z ~ p(z)                                   (the prior: N(0, I), Bernoulli, ...)
    x | z ~ prod_d Bernoulli(x_d | sigmoid(f_theta(z))_d)

``f_theta`` is an MLP emitting one logit per pixel (``mlp``), or one affine
map (``linear``: the one-layer sigmoid belief net of NVIL, MuProp and REBAR,
``logits = W z + b``).  What kind of latent the model has is the prior's
business: the same decoder with prior ``standard_normal`` and guide
``normal`` is the Gaussian-latent VAE (Kingma & Welling 2014; Burda et al.
2015), and with prior ``bernoulli`` and guide ``bernoulli`` a binary-latent VAE.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.distributions import BernoulliVector
from pyro_vae.nn import Activation, PartModule, mlp
from pyro_vae.registry import MODELS
from pyro_vae.traces import DATA_PLATE, OBSERVED_SITE


@MODELS.register("mlp")
class MLPDecoder(PartModule):
    """MLP decoder, Bernoulli pixels: p(x|z) = Bern(sigmoid(MLP(z))), z from the prior."""

    def __init__(
        self,
        prior: Callable[[int], dist.TorchDistribution],
        event_shape: tuple[int, ...],
        latent_dim: int = 50,
        hidden: list[int] = [200, 200],
        activation: Activation = "tanh",
    ):
        super().__init__()
        self.prior = prior
        self.event_shape = tuple(event_shape)
        self.latent_dim = latent_dim
        self.decoder = mlp(latent_dim, hidden, math.prod(self.event_shape), activation)

    def forward(self, x: Optional[torch.Tensor] = None, batch_size: Optional[int] = None) -> None:
        """Sample ``z`` and observe ``x`` (flattened to ``[B, D]``) in the data
        plate; with ``x=None`` draw ``batch_size`` images from the model."""
        batch_size = x.shape[0] if x is not None else batch_size
        obs = x.reshape(batch_size, -1) if x is not None else None
        with pyro.plate(DATA_PLATE, batch_size):
            z = pyro.sample("z", self.prior(batch_size))
            pyro.sample(OBSERVED_SITE, BernoulliVector(logits=self.decoder(z)), obs=obs)


MODELS.rename("gaussian", "mlp")  # its latent was always the prior's business


@MODELS.register("linear")
def linear(prior: Callable[[int], dist.TorchDistribution], event_shape: tuple[int, ...],
           latent_dim: int = 200) -> MLPDecoder:
    """Linear decoder (one-layer sigmoid belief net): p(x|z) = Bern(sigmoid(W z + b))."""
    return MLPDecoder(prior, event_shape, latent_dim, hidden=[])
