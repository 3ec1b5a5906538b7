"""Estimators that need the guide's latents to be independent Bernoullis,
``q(z | x) = prod_d Bernoulli(z_d; sigmoid(alpha_d(x)))``.

- :class:`DisARM` (Dong, Mnih & Tucker 2020), unbiased: with ``u ~ U(0,1)^D``,
  the antithetic pair ``b = 1[u < sigmoid(alpha)]``,
  ``b~ = 1[1 - u < sigmoid(alpha)]`` (each marginally ``q``) and
  ``f = log p(x, z) - log q(z | x)``::

      grad_alpha_d E_q[f] ~= 1/2 (f(b) - f(b~)) (-1)^{b~_d} 1[b_d != b~_d] sigmoid(|alpha_d|)

  (the conditional expectation of ARM's estimator given the pair), chained to
  the encoder through ``alpha``; the model's parameters get the average of
  ``grad log p(x, z)`` over both samples.
- :class:`Relaxed` (Concrete / Gumbel-sigmoid; Maddison et al. 2017, Jang et
  al. 2017), biased: ``z~ = sigmoid((alpha + logit(u)) / tau)`` feeds the
  decoder, and ``log p(x | z~) - KL(q || p)`` (the KL between the discrete
  Bernoullis, analytic) is differentiated along ``z~``.
- :class:`StraightThrough`, biased: the decoder sees the hard sample
  ``H = 1[alpha + logit(u) > 0]`` (exactly ``q``-distributed) in the forward
  pass and the gradient of the relaxed ``z~`` in the backward pass.

All three read ``alpha`` off one run of the guide, so they take a guide with
a single Bernoulli latent site whose batch shape is the data plate's ``[B]``
(a second site could depend on the first one's sample, which they would
ignore); others are refused.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.distributions import Independent

from pyro_vae.errors import ConfigError
from pyro_vae.objectives.base import Objective
from pyro_vae.registry import OBJECTIVES
from pyro_vae.traces import latent_sites, replay_particles


def bernoulli_logits(guide_trace: poutine.Trace, batch_size: int, estimator: str) -> dict[str, torch.Tensor]:
    """``alpha`` of the guide's latent site: ``{site: [B, *event]}``."""
    sites = list(latent_sites(guide_trace))
    if len(sites) != 1:
        raise ConfigError(f"{estimator} takes a guide with one latent site, not {[n for n, _ in sites]}: "
                          "a site's logits may depend on another's sample; use nvil or vimco")
    logits = {}
    for name, site in sites:
        fn = site["fn"]
        base = fn.base_dist if isinstance(fn, Independent) else fn
        if not isinstance(base, dist.Bernoulli):
            raise ConfigError(f"{estimator} needs Bernoulli latents, but the guide's site {name!r} is "
                              f"{type(fn).__name__}; use trace_elbo, tracegraph_elbo, nvil or vimco")
        if tuple(fn.batch_shape) != (batch_size,):
            raise ConfigError(f"{estimator} needs site {name!r} to have batch shape [B] = [{batch_size}] "
                              f"(the data plate only), not {list(fn.batch_shape)}")
        logits[name] = base.logits
    return logits


def _per_datapoint_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[K, B]`` -> ``[K, B, 1, ...]`` broadcastable against ``[K, B, *event]``."""
    return values.reshape(values.shape + (1,) * (like.dim() - values.dim()))


@OBJECTIVES.register("disarm")
class DisARM(Objective):
    """DisARM (Dong, Mnih & Tucker 2020): antithetic pairs of Bernoulli samples, unbiased, low variance."""

    def __init__(self, model, guide, num_pairs: int = 1):
        super().__init__(model, guide)
        self.num_pairs = num_pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        guide_trace = poutine.trace(self.guide).get_trace(x)
        logits = bernoulli_logits(guide_trace, x.shape[0], "disarm")
        pairs, first, second = {}, {}, {}
        for name, alpha in logits.items():
            u = torch.rand((self.num_pairs,) + alpha.shape, dtype=alpha.dtype, device=alpha.device)
            probs = torch.sigmoid(alpha.detach())
            first[name], second[name] = (u < probs).to(alpha.dtype), (1 - u < probs).to(alpha.dtype)
            pairs[name] = torch.cat([first[name], second[name]])
        particles = replay_particles(self.model, guide_trace, x, pairs, self.nesting(x))
        f = particles.log_weights().detach()  # [2K, B]
        half_difference = 0.5 * (f[: self.num_pairs] - f[self.num_pairs:])  # [K, B]
        surrogate = (particles.log_likelihood() + particles.log_prior()).mean(0).sum()
        for name, alpha in logits.items():
            b, b_tilde = first[name], second[name]
            weight = (1 - 2 * b_tilde) * (b != b_tilde) * torch.sigmoid(alpha.detach().abs())
            gradient = (_per_datapoint_to(half_difference, b) * weight).mean(0)  # d E_q[f] / d alpha
            surrogate = surrogate + (gradient * alpha).sum()
        loss = -f.mean(0).sum() - (surrogate - surrogate.detach())
        return self.report(loss, x.shape[0], elbo=f)


class _RelaxedBernoulli(Objective):
    """Shared by the relaxed and straight-through estimators: the temperature
    schedule ``tau(step) = max(tau_min, tau_0 exp(-rate * step))`` and the
    logistic noise."""

    def __init__(self, model, guide, temperature: float, anneal_rate: float, temperature_min: float,
                 num_particles: int):
        super().__init__(model, guide)
        if not 0 < temperature_min <= temperature:
            raise ConfigError(f"need 0 < temperature_min <= temperature, got {temperature_min} and {temperature}")
        self.temperature0, self.anneal_rate, self.temperature_min = temperature, anneal_rate, temperature_min
        self.num_particles = num_particles

    def temperature(self) -> float:
        return max(self.temperature_min, self.temperature0 * math.exp(-self.anneal_rate * self.context.step))

    def _samples(self, x: torch.Tensor):
        """The guide's trace, and per latent site the logistic-perturbed
        logits ``alpha + logit(u)``, ``[K, B, *event]``."""
        guide_trace = poutine.trace(self.guide).get_trace(x)
        perturbed = {}
        for name, alpha in bernoulli_logits(guide_trace, x.shape[0], self.estimator).items():
            eps = torch.finfo(alpha.dtype).eps  # keeps logit(u) finite
            u = torch.rand((self.num_particles,) + alpha.shape, dtype=alpha.dtype, device=alpha.device)
            u = u.clamp(eps, 1 - eps)
            perturbed[name] = alpha + torch.log(u) - torch.log1p(-u)
        return guide_trace, perturbed


@OBJECTIVES.register("relaxed")
class Relaxed(_RelaxedBernoulli):
    """Concrete / Gumbel-sigmoid relaxation (biased): log p(x | sigmoid((alpha + L) / tau)) - KL, reparameterized."""

    estimator = "relaxed"

    def __init__(self, model, guide, temperature: float = 0.5, anneal_rate: float = 0.0,
                 temperature_min: float = 0.1, num_particles: int = 1):
        """
        :param temperature: ``tau_0``; the relaxation is exact as ``tau -> 0``
            and its gradient's variance grows.
        :param anneal_rate: ``tau = max(temperature_min, tau_0 exp(-anneal_rate * step))``.
        """
        super().__init__(model, guide, temperature, anneal_rate, temperature_min, num_particles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tau = self.temperature()
        guide_trace, perturbed = self._samples(x)
        nesting = self.nesting(x)
        relaxed = replay_particles(self.model, guide_trace, x,
                                   {n: torch.sigmoid(v / tau) for n, v in perturbed.items()}, nesting)
        objective = relaxed.log_likelihood() - relaxed.kl()  # [K, B]
        with torch.no_grad():  # the discrete model's ELBO at the hard samples of the same noise
            hard = replay_particles(self.model, guide_trace, x,
                                    {n: (v > 0).to(v.dtype) for n, v in perturbed.items()}, nesting)
            elbo = hard.log_weights()
        loss = -objective.mean(0).sum()
        return self.report(loss, x.shape[0], elbo=elbo, relaxed_objective=objective, temperature=tau)


@OBJECTIVES.register("straight_through")
class StraightThrough(_RelaxedBernoulli):
    """Straight-through Gumbel-sigmoid (biased): hard Bernoulli samples forward, relaxed gradient backward."""

    estimator = "straight_through"

    def __init__(self, model, guide, temperature: float = 1.0, anneal_rate: float = 0.0,
                 temperature_min: float = 0.1, num_particles: int = 1):
        super().__init__(model, guide, temperature, anneal_rate, temperature_min, num_particles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tau = self.temperature()
        guide_trace, perturbed = self._samples(x)
        values = {}
        for name, v in perturbed.items():
            soft = torch.sigmoid(v / tau)
            values[name] = (v > 0).to(v.dtype) + soft - soft.detach()
        particles = replay_particles(self.model, guide_trace, x, values, self.nesting(x))
        elbo = particles.log_likelihood() - particles.kl()  # at the hard samples: the discrete model's ELBO
        loss = -elbo.mean(0).sum()
        return self.report(loss, x.shape[0], elbo=elbo, temperature=tau)
