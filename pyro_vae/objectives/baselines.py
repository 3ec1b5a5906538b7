"""Control variates for score-function estimators.

The score-function (REINFORCE) estimator of ``grad_phi E_q[f(z)]`` is
``f(z) grad_phi log q(z | x)``.  Since ``E_q[grad_phi log q(z | x)] = 0``,
subtracting any ``b`` that does not depend on the sample ``z`` keeps it
unbiased, ``(f(z) - b) grad_phi log q(z | x)``, and a ``b`` close to
``E_q[f]`` removes most of its variance.  Two such ``b``:

- :class:`RunningMoments`: decaying averages of the learning signal's mean
  (a baseline shared by every datapoint) and variance (for NVIL's
  normalisation), updated *after* the step that used them, so the baseline
  never depends on the current sample;
- :class:`NeuralBaseline`: ``b_psi(x)``, an MLP of the datapoint trained to
  minimise ``(f(z) - b_psi(x))^2`` (Mnih & Gregor 2014).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pyro_vae.nn import Tanh, mlp


class RunningMoments(nn.Module):
    """Exponentially decaying mean and variance of a signal::

        mean <- beta mean + (1 - beta) batch_mean
        var  <- beta var  + (1 - beta) batch_var

    started at the first batch's moments (:meth:`start`: an objective calls
    it before its first use, so that the first step's signal is centred too,
    at the price of one step's baseline seeing its own batch).  Buffers, so
    they follow ``.to(device)`` and are checkpointed."""

    def __init__(self, beta: float):
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"baseline_beta must lie in [0, 1), got {beta}")
        self.beta = beta
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._started = False  # mirrors count > 0 on the host: no device sync a step, nothing
        # data-dependent for torch.compile to trace (set where the count is loaded)

    @property
    def started(self) -> bool:
        return self._started

    @torch.no_grad()
    def start(self, signal: torch.Tensor) -> None:
        """Take the first batch's moments, if no batch has been seen."""
        if not self.started:
            self.mean.copy_(signal.mean())
            self.var.copy_(signal.var(unbiased=False) if signal.numel() > 1 else torch.zeros_like(self.var))

    @torch.no_grad()
    def update(self, signal: torch.Tensor) -> None:
        """Fold in one batch of the signal (the first batch sets the moments)."""
        if not self.started:
            self.start(signal)
        else:
            self.mean.lerp_(signal.mean().to(self.mean), 1 - self.beta)
            if signal.numel() > 1:
                self.var.lerp_(signal.var(unbiased=False).to(self.var), 1 - self.beta)
        self.count += 1
        self._started = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._started = bool(self.count > 0)


class NeuralBaseline(nn.Module):
    """``b_psi(x)``: an MLP from the flattened datapoint to one number,
    ``[B, *event] -> [B]``.  Its input width is inferred on the first call
    (a lazy layer), so it needs no data spec."""

    def __init__(self, hidden: Sequence[int] = (100,)):
        super().__init__()
        first = nn.LazyLinear(hidden[0] if hidden else 1)
        rest = mlp(hidden[0], hidden[1:], 1, "tanh") if hidden else nn.Identity()
        self.net = nn.Sequential(first, Tanh(), rest) if hidden else first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).squeeze(-1)
