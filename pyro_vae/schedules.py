"""Schedules, pure functions of the optimizer step ``t``.

KL-weight annealing (:func:`kl_annealing`), against posterior collapse, over
``T = anneal_steps`` steps (1 afterwards):

- ``none``: 1;
- ``linear`` (Bowman et al. 2016): ``min(1, t / T)``;
- ``sigmoid`` (Bowman et al.'s logistic): ``1 / (1 + exp(-10 (t - T/2) / T))``,
  0.0067 at ``t = 0``, 0.5 at ``T/2``, 0.9933 at ``T``;
- ``cyclical`` (Fu et al. 2019): ``M = cycles`` periods of ``T / M`` steps;
  within one, at ``tau = (t mod (T/M)) / (T/M)``, the weight is ``tau / R``
  while ``tau <= R`` (``R = cycle_ratio``), then 1.

Learning-rate schedules: the learning rate at optimizer step ``t`` is
``lr * warmup(t) * schedule(t)``, a pure function of the step, applied by
:class:`torch.optim.lr_scheduler.LambdaLR` (whose state the checkpoint keeps).

- ``constant``: 1.
- ``burda`` (Burda et al. 2015, section 5): stage ``i = 0, 1, ..., 7`` lasts
  ``3^i`` epochs at ``10^(-i/7)``, 3,280 epochs in all (then the last stage's
  rate);
- ``cosine``: ``(1 + cos(pi t / T)) / 2`` over the ``T`` steps of
  ``train.epochs`` (Loshchilov & Hutter 2017, without restarts);
- warm-up: ``min(1, (t + 1) / warmup_steps)`` in front of any of them.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

Schedule = Literal["constant", "burda", "cosine"]
Annealing = Literal["none", "linear", "sigmoid", "cyclical"]


def kl_annealing(kind: Annealing, step: int, anneal_steps: int, cycles: int = 4, cycle_ratio: float = 0.5) -> float:
    """The KL weight's annealing factor at optimizer step ``step`` (see the module docstring)."""
    if kind == "none" or step >= anneal_steps:
        return 1.0
    if kind == "linear":
        return step / anneal_steps
    if kind == "sigmoid":
        return 1.0 / (1.0 + math.exp(-10.0 * (step - anneal_steps / 2) / anneal_steps))
    period = anneal_steps / cycles
    tau = (step % period) / period
    return min(1.0, tau / cycle_ratio)
BURDA_STAGES = 8


def burda_stage(epoch: int) -> int:
    """The stage ``i`` of 0-based ``epoch``: stages last 1, 3, 9, ... epochs."""
    stage, end = 0, 1
    while epoch >= end and stage < BURDA_STAGES - 1:
        stage += 1
        end += 3**stage
    return stage


def lr_multiplier(schedule: Schedule, steps_per_epoch: int, total_steps: int,
                  warmup_steps: int = 0) -> Callable[[int], float]:
    """The factor on the base learning rate at optimizer step ``t`` (0-based)."""

    def shape(t: int) -> float:
        if schedule == "burda":
            return 10.0 ** (-burda_stage(t // steps_per_epoch) / 7)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / max(total_steps, 1)))
        return 1.0

    def multiplier(t: int) -> float:
        warm = min(1.0, (t + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * shape(t)

    return multiplier
