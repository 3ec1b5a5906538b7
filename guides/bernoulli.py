"""The amortized independent-Bernoulli guide for binary latents::

    q(z | x) = prod_i Bernoulli(z_i | sigmoid(alpha_phi(x)_i)),   alpha = MLP_phi(x)

Its samples are not differentiable in ``phi`` (no ``rsample``): objectives
reach the encoder through the score function (``trace_elbo``,
``tracegraph_elbo``, ``nvil``, ``vimco``), an antithetic pair (``disarm``) or
a relaxation (``relaxed``, ``straight_through``).  With ``hidden = []`` the
encoder is linear, as in the sigmoid-belief-net papers.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from pyro_vae.contract import DistributionGuide
from pyro_vae.nn import Activation, mlp
from pyro_vae.registry import GUIDES


@GUIDES.register("bernoulli")
class BernoulliGuide(DistributionGuide):
    """MLP encoder to independent Bernoullis q(z|x) = Bern(sigmoid(MLP(x)))."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        hidden: list[int] = [200],
        activation: Activation = "tanh",
    ):
        super().__init__()
        self.encoder = mlp(math.prod(event_shape), hidden, latent_dim, activation)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(z | x)`` for the batch ``x``: batch shape ``[B]``, event ``[D]``."""
        return dist.Bernoulli(logits=self.encoder(x.reshape(x.shape[0], -1))).to_event(1)
