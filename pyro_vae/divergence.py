"""Telling a training step that went wrong from one that did not.

Two failures are watched, after every optimizer step:

- a *non-finite* loss or gradient.  Both are checked before the optimizer
  applies the gradients (:class:`GuardedOptimizer`), so a bad batch changes
  no parameter and can be skipped, up to ``max_bad_steps`` times in a run;
- an *exploding* loss: with ``m`` the running mean of the per-datapoint loss
  (an exponential average, decay 0.99), a step whose loss ``l`` satisfies
  ``l > m + factor * max(|m|, 1)`` stops training, since a finite loss that
  grows by orders of magnitude ends in garbage, not in a model.

When training stops, :func:`locate_non_finite` names the culprit from a trace
of the model and guide on the bad batch: the first sample site whose
log-density is not finite, else the first parameter or gradient that is not.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import pyro
import torch

from pyro_vae.distributed import Ranks
from pyro_vae.traces import guide_and_model_traces, sample_sites


class GuardedOptimizer:
    """Wraps a :class:`torch.optim.Optimizer` for one objective; :meth:`step`
    applies the update only when the objective's last loss (its ``loss``
    metric) and every gradient are finite, and records in :attr:`skipped`
    whether it did not.  One host sync a step: the check must finish before
    the update (see :func:`count_non_finite`).

    Across ``ranks`` (data-parallel training) the gradients, the summed loss,
    the batch size and a stop request are summed over the ranks first, in one
    collective, so every rank applies the gradient of the global batch and
    takes the same decisions: set :attr:`batch_size` and :attr:`stop` before
    each step; :attr:`loss_per_datapoint` and :attr:`stop_any` hold the
    global figures after it."""

    def __init__(self, optimizer: torch.optim.Optimizer, objective: torch.nn.Module, ranks: Ranks = Ranks()):
        self.optimizer = optimizer
        self.objective = objective
        self.ranks = ranks
        self.skipped = False
        self.batch_size, self.stop = 0, False
        self.loss_per_datapoint, self.stop_any = math.nan, False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def poison(self) -> None:
        """A step whose forward failed: NaN gradients, so the step is skipped
        by every rank (which still meet in the collective)."""
        for p in self._parameters():
            p.grad = torch.full_like(p, math.nan)
        self.objective.metrics = {"loss": torch.tensor(math.nan)}

    def step(self) -> None:
        loss = self.objective.metrics["loss"].float().reshape(())
        if self.ranks.active:
            grads = self._filled_grads()
            totals = torch.stack([loss * self.batch_size, loss.new_tensor(float(self.batch_size)),
                                  loss.new_tensor(float(self.stop))])  # (one device: the loss's)
            self.ranks.all_reduce_sum_(grads + [totals])
            loss, self.stop_any = totals[0], bool(totals[2] > 0)
            self.loss_per_datapoint = (totals[0] / totals[1]).item()
        else:
            grads = [p.grad for p in self._parameters() if p.grad is not None]
            self.stop_any = self.stop
        self.skipped = bool(count_non_finite(grads, loss) > 0)
        if not self.skipped:
            self.optimizer.step()

    def _filled_grads(self) -> list[torch.Tensor]:
        """Every trainable parameter's gradient, zeros where its part of the
        batch left one unset: the ranks must reduce the same tensors."""
        grads = []
        for p in self._parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        return grads

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups


def count_non_finite(grads: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Nonzero when ``loss`` or any element of ``grads`` is NaN or infinite.
    PyTorch's check for mixed-precision training, one kernel per dtype, looks
    at every element (a 2-norm would overflow for finite gradients near 1e19;
    the infinity norm costs ~25x more on the CPU)."""
    found = (~torch.isfinite(loss)).float().reshape(1)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in groups.items():
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, torch.ones(1, device=device))
        found = found + flag.to(found.device)
    return found


class DivergenceMonitor:
    """Classifies each step's per-datapoint loss: ``"ok"``, ``"bad"`` (not
    finite, or its update was skipped) or ``"exploded"``.

    :param factor: the explosion threshold (``inf``: never).
    :param decay: of the running mean.
    """

    def __init__(self, factor: float, decay: float = 0.99):
        self.factor = factor
        self.decay = decay
        self.running_mean: Optional[float] = None

    def classify(self, loss: float, update_skipped: bool) -> str:
        if update_skipped or not math.isfinite(loss):
            return "bad"
        m = self.running_mean
        if m is not None and loss > m + self.factor * max(abs(m), 1.0):
            return "exploded"
        self.running_mean = loss if m is None else self.decay * m + (1 - self.decay) * loss
        return "ok"


@torch.no_grad()
def locate_non_finite(model: Callable, guide: Callable, x: torch.Tensor, modules: dict[str, torch.nn.Module]) -> str:
    """Where the non-finite numbers are: ``"the log-density of the guide's
    sample site 'z'"``, ``"parameter model.decoder.0.weight"``, ``"the
    gradient of parameter ..."`` (or a statement that none was found)."""
    for name, module in modules.items():
        for pname, p in module.named_parameters():
            if not torch.isfinite(p).all():
                return f"parameter {name}.{pname} (it holds NaN or infinity)"
    with pyro.validation_enabled(False):
        guide_trace, model_trace = guide_and_model_traces(model, guide, x)
    for owner, trace in (("guide", guide_trace), ("model", model_trace)):
        for site_name, site in sample_sites(trace):
            if not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                return f"the log-density of the {owner}'s sample site {site_name!r}"
    for name, module in modules.items():
        for pname, p in module.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"the gradient of parameter {name}.{pname}"
    return "no site or parameter (the loss itself overflowed)"
