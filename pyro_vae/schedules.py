"""Learning-rate schedules: the learning rate at optimizer step ``t`` is
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
