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
from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.nn import Activation, PartModule, mlp
from pyro_vae.registry import GUIDES
from pyro_vae.traces import DATA_PLATE


@GUIDES.register("bernoulli")
class BernoulliGuide(PartModule):
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

    def forward(self, x: torch.Tensor, batch_size: Optional[int] = None) -> None:
        batch_size = x.shape[0]
        logits = self.encoder(x.reshape(batch_size, -1))
        with pyro.plate(DATA_PLATE, batch_size):
            pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))
