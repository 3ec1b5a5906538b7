"""Priors p(z): modules returning a distribution with batch shape ``[B]`` and
the latent as event shape, so a model does ``pyro.sample("z", self.prior(B))``."""
from __future__ import annotations

import pyro.distributions as dist
import torch

from pyro_vae.nn import PartModule
from pyro_vae.registry import PRIORS


@PRIORS.register("standard_normal")
class StandardNormalPrior(PartModule):
    """Isotropic Gaussian p(z) = N(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        # buffers, so the prior follows the model with `.to(device)`
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).expand([batch_size, self.loc.shape[-1]]).to_event(1)


@PRIORS.register("bernoulli")
class BernoulliPrior(PartModule):
    """Independent Bernoullis p(z) = prod_i Ber(z_i; sigmoid(a_i)); a = 0 (fair coins) or learned."""

    def __init__(self, latent_dim: int, learned: bool = False):
        super().__init__()
        logits = torch.zeros(latent_dim)
        if learned:
            self.logits = torch.nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=self.logits).expand([batch_size, self.logits.shape[-1]]).to_event(1)
