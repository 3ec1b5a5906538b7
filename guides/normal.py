"""The amortized diagonal-Gaussian guide::

    q(z | x) = N(z | mu_phi(x), diag sigma_phi(x)^2),
    (mu, s) = MLP_phi(x),  sigma = softplus(s) + 1e-4

The softplus (rather than exp) keeps sigma finite for any encoder output.
"""
from __future__ import annotations

import math
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch.nn.functional import softplus

from pyro_vae.nn import Activation, PartModule, mlp
from pyro_vae.registry import GUIDES
from pyro_vae.traces import DATA_PLATE

MIN_SCALE = 1e-4


class DistributionGuide(PartModule):
    """A guide given by :meth:`distribution`, ``q(z | x)`` for a batch ``x``
    (batch shape ``[B]``, the latent as event shape), sampled at site ``"z"``
    in the data plate.  ``distribution`` is what the VampPrior evaluates at its
    pseudo-inputs."""

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, batch_size: Optional[int] = None) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            pyro.sample("z", self.distribution(x))


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
