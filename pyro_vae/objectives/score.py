"""Score-function estimators with learned and multi-sample control variates.

- :class:`NVIL` (Mnih & Gregor 2014): the ELBO's score-function gradient with
  the learning signal ``l = log p(x, z) - log q(z | x)`` centred by a running
  mean ``c`` and an input-dependent baseline ``b_psi(x)``, and divided by a
  running standard deviation::

      grad_phi ~= (l - c - b_psi(x)) / max(1, sd) * grad_phi log q(z | x)

  unbiased up to the positive scale ``1 / max(1, sd)`` (an adaptive step
  size), since ``c``, ``sd`` come from earlier batches and ``b_psi`` does not
  see ``z``.
- :class:`VIMCO` (Mnih & Rezende 2016): the gradient of the K-sample bound
  ``L_K = log (1/K) sum_k w_k``::

      grad L_K = sum_k w~_k grad log w_k + sum_k (L_K - L_K^{-k}) grad_phi log q(z_k | x)

  where ``w~_k = w_k / sum_j w_j`` and ``L_K^{-k}`` is ``L_K`` with ``log w_k``
  replaced by the mean of the other ``K - 1`` log weights: a per-sample
  baseline that does not depend on ``z_k``.
"""
from __future__ import annotations

from typing import Optional

import torch

from pyro_vae.errors import ConfigError
from pyro_vae.objectives.base import Objective
from pyro_vae.objectives.baselines import NeuralBaseline, RunningMoments
from pyro_vae.objectives.elbo import score_term
from pyro_vae.registry import OBJECTIVES
from pyro_vae.traces import draw_particles, log_mean_exp


@OBJECTIVES.register("nvil")
class NVIL(Objective):
    """NVIL (Mnih & Gregor 2014): score function, running-mean + neural baseline, variance normalisation."""

    def __init__(
        self,
        model,
        guide,
        baseline_hidden: list[int] = [100],
        baseline_beta: float = 0.8,
        baseline_lr: Optional[float] = None,
        normalise: bool = True,
        num_particles: int = 1,
    ):
        """
        :param baseline_hidden: hidden widths of ``b_psi(x)`` (``[]``: linear).
        :param baseline_beta: decay of the running mean and variance (0.8 in the paper).
        :param baseline_lr: learning rate of ``b_psi`` (default: ``train.lr``).
        :param normalise: divide the centred signal by ``max(1, running sd)``.
        """
        super().__init__(model, guide)
        self.num_particles = num_particles
        self.normalise = normalise
        self.baseline_lr = baseline_lr
        self.moments = RunningMoments(baseline_beta)
        self.baseline = NeuralBaseline(baseline_hidden)

    def signal_scale(self) -> torch.Tensor:
        """``max(1, sd)``, the divisor of the centred learning signal."""
        return self.moments.var.sqrt().clamp(min=1.0) if self.normalise else torch.ones_like(self.moments.var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        particles = draw_particles(self.model, self.guide, x, self.num_particles, self.nesting(x))
        log_w = particles.log_weights()  # [K, B]
        residual = log_w.detach() - self.baseline(x)  # l - b_psi(x), differentiable in psi only
        if self.training:
            self.moments.start(residual.detach())  # the first batch centres itself
        signal = (residual.detach() - self.moments.mean) / self.signal_scale()
        surrogate = (particles.log_likelihood() + particles.log_prior() - particles.log_guide(reparameterized=True)
                     + score_term(signal, particles.log_guide(reparameterized=False)))
        baseline_loss = (residual - self.moments.mean).pow(2).mean(0).sum()
        loss = -log_w.detach().mean(0).sum() - (surrogate - surrogate.detach()).mean(0).sum() \
            + (baseline_loss - baseline_loss.detach())
        if self.training:
            self.moments.update(residual.detach())
        return self.report(loss, x.shape[0], elbo=log_w, baseline_mse=baseline_loss / (x.shape[0]),
                           signal_sd=self.moments.var.sqrt())


@OBJECTIVES.register("vimco")
class VIMCO(Objective):
    """VIMCO (Mnih & Rezende 2016): the K-sample bound L_K with leave-one-out per-sample baselines."""

    def __init__(self, model, guide, num_particles: int = 5):
        super().__init__(model, guide)
        if num_particles < 2:
            raise ConfigError(f"vimco needs objective.num_particles >= 2 (it is {num_particles}): "
                              "its baselines leave one of the K samples out")
        self.num_particles = num_particles

    @staticmethod
    def leave_one_out_bounds(log_w: torch.Tensor) -> torch.Tensor:
        """``L_K^{-k}`` for each ``k``: ``L_K`` with ``log w_k`` replaced by the
        mean of the other log weights.  ``log_w``: ``[K, B]`` -> ``[K, B]``."""
        num = log_w.shape[0]
        others_mean = (log_w.sum(0, keepdim=True) - log_w) / (num - 1)
        replaced = log_w.unsqueeze(0).repeat(num, 1, 1)  # [k, j, B]: row k has log w_k swapped out
        index = torch.arange(num, device=log_w.device)
        replaced[index, index] = others_mean
        return log_mean_exp(replaced, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        particles = draw_particles(self.model, self.guide, x, self.num_particles, self.nesting(x))
        log_w = particles.log_weights()  # [K, B], differentiable along every path
        bound = log_mean_exp(log_w, dim=0)  # [B]
        signal = bound.detach() - self.leave_one_out_bounds(log_w.detach())
        surrogate = bound + score_term(signal, particles.log_guide(reparameterized=False)).sum(0)
        loss = -bound.detach().sum() - (surrogate - surrogate.detach()).sum()
        return self.report(loss, x.shape[0], elbo=log_w, iw_bound=bound)
