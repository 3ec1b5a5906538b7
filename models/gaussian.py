"""The Gaussian-latent VAE with a Bernoulli likelihood on pixels (Kingma &
Welling 2014; Burda et al. 2015's one-stochastic-layer model)::

    z ~ p(z)                                (the prior, e.g. N(0, I))
    x | z ~ prod_d Bernoulli(x_d | sigmoid(f_theta(z))_d)

``f_theta`` is an MLP emitting one logit per pixel.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_vae.distributions import BernoulliVector
from pyro_vae.nn import Activation, mlp
from pyro_vae.registry import MODELS


@MODELS.register("gaussian")
class GaussianLatentVAE(PyroModule):
    """Gaussian latent z, MLP decoder, Bernoulli pixels: p(x|z) = Bern(sigmoid(MLP(z)))."""

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
        with pyro.plate("data", batch_size):
            z = pyro.sample("z", self.prior(batch_size))
            pyro.sample("x", BernoulliVector(logits=self.decoder(z)), obs=obs)
