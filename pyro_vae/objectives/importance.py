"""The importance-weighted bound as a training objective (Burda et al. 2015)::

    L_K(x) = E[log (1/K) sum_k w_k],   w_k = p(x, z_k) / q(z_k | x),   z_1..K ~ q(. | x)

``L_1`` is the ELBO, ``L_K <= L_{K+1} <= log p(x)``, and ``L_K -> log p(x)``
as ``K`` grows.  Its gradient::

    grad L_K = E[sum_k w~_k grad log w_k + L_K(z_1..K) sum_k grad_phi log q(z_k | x)],   w~_k = w_k / sum_j w_j

The first term flows through reparameterized samples; the second, the score
function, is needed only for sites without ``rsample`` (binary latents),
whose values carry no gradient.  It has no baseline: ``vimco`` is the same
bound with leave-one-out baselines, which such sites want.
"""
from __future__ import annotations

import torch

from pyro_vae.errors import ConfigError
from pyro_vae.objectives.base import Objective
from pyro_vae.objectives.elbo import score_term
from pyro_vae.registry import OBJECTIVES
from pyro_vae.traces import draw_particles, log_mean_exp


@OBJECTIVES.register("iwae")
class IWAE(Objective):
    """IWAE (Burda et al. 2015): the K-sample importance-weighted bound L_K = log (1/K) sum_k w_k."""

    def __init__(self, model, guide, num_particles: int = 5):
        """:param num_particles: ``K``, the samples per datapoint (1: the ELBO)."""
        super().__init__(model, guide)
        if num_particles < 1:
            raise ConfigError(f"iwae needs objective.num_particles >= 1 (it is {num_particles})")
        self.num_particles = num_particles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        particles = draw_particles(self.model, self.guide, x, self.num_particles, self.nesting(x))
        log_w = particles.log_weights()  # [K, B], differentiable along reparameterized paths
        bound = log_mean_exp(log_w, dim=0)  # [B]
        surrogate = bound + score_term(bound, particles.log_guide(reparameterized=False)).sum(0)
        loss = -bound.detach().sum() - (surrogate - surrogate.detach()).sum()
        return self.report(loss, x.shape[0], elbo=log_w, iw_bound=bound)
