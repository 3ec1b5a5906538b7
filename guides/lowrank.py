"""The amortized Gaussian guide with a low-rank-plus-diagonal covariance::

    q(z | x) = N(z | mu_phi(x), F_phi(x) F_phi(x)^T + diag d_phi(x)),
    F: [D, rank],  d = softplus(.) + 1e-4

Correlations between latent dimensions in the posterior (which a diagonal
guide cannot express) at ``O(D rank)`` cost; ``rank = D`` gives a full
covariance.  No analytic KL to a factorised prior: ``meanfield_elbo`` uses
the one-sample estimate, and the KL per dimension is reported as one total.
"""
from __future__ import annotations

import math
import pyro.distributions as dist
import torch
from torch.nn.functional import softplus

from guides.normal import MIN_SCALE
from pyro_vae.contract import DistributionGuide
from pyro_vae.nn import Activation, mlp
from pyro_vae.registry import GUIDES


@GUIDES.register("lowrank_normal")
class LowRankNormalGuide(DistributionGuide):
    """MLP encoder to a Gaussian with low-rank-plus-diagonal covariance q(z|x) = N(mu(x), F(x)F(x)^T + diag d(x))."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        hidden: list[int] = [200, 200],
        activation: Activation = "tanh",
        rank: int = 2,
    ):
        """:param rank: columns of the covariance factor ``F``."""
        super().__init__()
        self.latent_dim, self.rank = latent_dim, rank
        self.encoder = mlp(math.prod(event_shape), hidden, latent_dim * (2 + rank), activation)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        out = self.encoder(x.reshape(x.shape[0], -1))
        d = self.latent_dim
        loc, raw_diag, factor = out[:, :d], out[:, d:2 * d], out[:, 2 * d:]
        return dist.LowRankMultivariateNormal(loc, factor.reshape(-1, d, self.rank), softplus(raw_diag) + MIN_SCALE)
