"""The amortized diagonal-Gaussian guide::

    q(z | x) = N(z | mu_phi(x), diag sigma_phi(x)^2),
    (mu, s) = MLP_phi(x),  sigma = softplus(s) + 1e-4

The softplus (rather than exp) keeps sigma finite for any encoder output.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.nn.functional import softplus

from pyro_vae.contract import DistributionGuide
from pyro_vae.nn import Activation, mlp
from pyro_vae.registry import GUIDES

MIN_SCALE = 1e-4


@GUIDES.register("normal")
class DiagonalNormalGuide(DistributionGuide):
    """MLP encoder to a diagonal Gaussian q(z|x) = N(mu(x), diag sigma(x)^2)."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        hidden: list[int] = [200, 200],
        activation: Activation = "tanh",
    ):
        super().__init__()
        self.encoder = mlp(math.prod(event_shape), hidden, 2 * latent_dim, activation)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(z | x)`` for the batch ``x``: batch shape ``[B]``, event ``[D]``."""
        loc, raw_scale = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + MIN_SCALE).to_event(1)
