"""Objectives that reweight the ELBO's KL term, or parts of it, for
disentangled latents.

- ``beta`` (Higgins et al. 2017): ``E_q[log p(x|z)] - beta KL(q(z|x) || p(z))``.
- ``capacity`` (Burgess et al. 2018): ``E_q[log p(x|z)] - gamma |KL(q(z|x) || p(z)) - C|``
  per datapoint, the capacity ``C = c_max min(1, step / anneal_steps)`` rising
  linearly over the optimizer steps.
- ``beta_tc`` (Chen et al. 2018): ``E_q[log p(x|z)] - alpha MI - beta TC - gamma dwKL``,
  the KL split as in :mod:`pyro_vae.aggregate`, ``log q(z)`` estimated over
  the minibatch (MWS or MSS, the latter with the training-set size from the
  training context).  ``alpha = beta = gamma = 1`` is the ELBO, sample by sample.

Each reports the ELBO itself as its ``elbo`` metric, apart from the loss.
"""
from __future__ import annotations

from typing import Literal

import torch

from pyro_vae.aggregate import aggregate_log_densities, kl_terms, mss_log_weights, mws_log_weights, \
    pairwise_log_density, single_factorised_latent
from pyro_vae.errors import ConfigError
from pyro_vae.objectives.base import Objective
from pyro_vae.objectives.elbo import MeanFieldELBO
from pyro_vae.registry import OBJECTIVES
from pyro_vae.traces import draw_particles


@OBJECTIVES.register("beta")
class BetaELBO(MeanFieldELBO):
    """beta-VAE: E_q[log p(x|z)] - beta KL(q(z|x) || p(z)); beta = 1 is meanfield_elbo."""

    def __init__(self, model, guide, beta: float = 4.0, num_particles: int = 1):
        super().__init__(model, guide, num_particles)
        self.beta = beta

    def penalty(self, kl):
        return self.beta * kl, {}


@OBJECTIVES.register("capacity")
class CapacityELBO(MeanFieldELBO):
    """Burgess et al.: E_q[log p(x|z)] - gamma |KL - C|, C annealed linearly from 0 to c_max over anneal_steps."""

    def __init__(self, model, guide, gamma: float = 1000.0, c_max: float = 25.0, anneal_steps: int = 100_000,
                 num_particles: int = 1):
        super().__init__(model, guide, num_particles)
        if anneal_steps < 1:
            raise ConfigError("capacity's anneal_steps must be at least 1")
        self.gamma, self.c_max, self.anneal_steps = gamma, c_max, anneal_steps

    def capacity(self, step: int) -> float:
        """``C(step) = c_max min(1, step / anneal_steps)`` nats."""
        return self.c_max * min(1.0, step / self.anneal_steps)

    def penalty(self, kl):
        c = self.capacity(self.context.step)
        return self.gamma * (kl - c).abs(), {"capacity": c}


@OBJECTIVES.register("beta_tc")
class BetaTCELBO(Objective):
    """beta-TCVAE: E_q[log p(x|z)] - alpha MI - beta TC - gamma dimension-wise KL, log q(z) over the minibatch (mss | mws)."""

    def __init__(self, model, guide, alpha: float = 1.0, beta: float = 6.0, gamma: float = 1.0,
                 estimator: Literal["mss", "mws"] = "mss"):
        super().__init__(model, guide)
        self.alpha, self.beta, self.gamma, self.estimator = alpha, beta, gamma, estimator

    def log_weights(self, batch_size: int, device) -> torch.Tensor:
        if self.estimator == "mws":
            return mws_log_weights(batch_size, device)
        return mss_log_weights(batch_size, self.context.num_train or batch_size, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        particles = draw_particles(self.model, self.guide, x, 1, self.nesting(x))
        site, base = single_factorised_latent(particles.guide_trace, "beta_tc")
        z = site["value"].reshape(batch, -1)
        log_pairs = pairwise_log_density(base, z)  # [B, B, D]
        log_qz, log_qz_dims = aggregate_log_densities(log_pairs, self.log_weights(batch, x.device))
        log_likelihood, log_pz, log_q = particles.log_likelihood()[0], particles.log_prior()[0], particles.log_guide()[0]
        terms = kl_terms(log_q, log_qz, log_qz_dims, log_pz)
        objective = (log_likelihood - self.alpha * terms["mutual_information"]
                     - self.beta * terms["total_correlation"] - self.gamma * terms["dimensionwise_kl"])
        return self.report(-objective.sum(), batch, elbo=log_likelihood + log_pz - log_q, **terms)
