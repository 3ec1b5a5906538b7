"""The objective protocol: a loss module with a training context.

``OBJECTIVES.build(name, options)(model, guide)`` gives an :class:`Objective`,
a :class:`torch.nn.Module` holding the model and guide (and any parameters of
its own, such as a baseline network).  ``loss = objective(x)`` is a scalar
whose *value* is the negative of the objective's estimate summed over the
batch and whose *gradient* with respect to every parameter is the
objective's gradient estimator (for score-function estimators a surrogate
loss), so ``loss.backward()`` and a :mod:`torch.optim` optimizer train it.

Each forward leaves named per-datapoint metrics in :attr:`Objective.metrics`
(means over the batch, detached): ``loss`` always, ``elbo`` (an unbiased
estimate of the ELBO of the discrete or continuous model, whatever the loss
optimises) wherever it can be had, and the objective's own terms.  The
trainer logs them; it never derives the ELBO from the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyro
import torch

from pyro_vae.traces import max_plate_nesting


@dataclass
class TrainingContext:
    """Where training stands, read by schedules (temperatures, annealing) and
    by estimators that need the training-set size.

    :param step: optimizer steps taken before the current one.
    :param epoch: the current epoch (1-based).
    :param num_train: datapoints in the training split (``None``: unknown).
    :param steps_per_epoch: optimizer steps in an epoch (``None``: unknown).
    :param draw_batch: a random training minibatch of the trainer's size on
        each call (``None`` outside the trainer), for objectives whose step
        takes more than one (aggressive encoder updates).
    :param valid: the validation split (``None`` outside the trainer), for
        objectives that watch it within an epoch (the aggressive phase's I(x; z)).
    """

    step: int = 0
    epoch: int = 1
    num_train: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    draw_batch: Optional[Callable[[], torch.Tensor]] = None
    valid: Optional[Any] = None


class Objective(torch.nn.Module):
    """Base of every objective: holds ``model`` and ``guide``, a
    :class:`TrainingContext` and the metrics of the last forward.

    Subclasses implement :meth:`forward`; they may override
    :meth:`param_groups` (parameters with their own learning rate) and
    :meth:`step` (an objective that owns its optimisation step)."""

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module):
        super().__init__()
        self.model = model
        self.guide = guide
        self.context = TrainingContext()
        self.metrics: dict[str, torch.Tensor] = {}
        self._nesting: Optional[int] = None

    def nesting(self, x: torch.Tensor) -> int:
        """The model's plate nesting, found by one traced run on first use."""
        if self._nesting is None:
            self._nesting = max_plate_nesting(self.model, self.guide, x)
        return self._nesting

    def report(self, loss: torch.Tensor, batch_size: int, **per_datapoint: torch.Tensor) -> torch.Tensor:
        """Record ``loss / B`` and the batch means of ``per_datapoint`` metrics
        (tensors of shape ``[K, B]``, ``[B]`` or scalars) as :attr:`metrics`;
        return ``loss``."""
        self.metrics = {"loss": loss.detach() / batch_size}
        for name, value in per_datapoint.items():
            self.metrics[name] = value.detach().mean() if torch.is_tensor(value) else torch.tensor(float(value))
        return loss

    @torch.no_grad()
    def prepare(self, x: torch.Tensor) -> None:
        """One forward on a small batch, in eval mode and without gradients,
        before the optimizer is built: it finds the plate nesting and gives
        lazily shaped parameters (a baseline's input width) their shapes."""
        was_training = self.training
        self.eval()
        with pyro.validation_enabled(False):
            self(x)
        self.train(was_training)

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer: the model's and guide's, and the
        parameters of a submodule named ``baseline`` (a control variate's
        network) apart, with learning rate ``self.baseline_lr`` where set.  A
        group without ``lr`` gets the trainer's learning rate."""
        main, baseline = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (baseline if name.startswith("baseline.") else main).append(p)
        if not baseline:
            return [{"params": main}]
        lr = getattr(self, "baseline_lr", None)
        return [{"params": main}, {"params": baseline, **({"lr": lr} if lr else {})}]

    def step(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One optimisation step on the batch ``x``; returns the detached loss."""
        loss = self(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def takes_plain_step(self) -> bool:
        """Whether the next :meth:`step` is the plain one (the loss, its
        gradient, one optimizer step): the trainer may then compile it whole
        (:mod:`pyro_vae.compiled_step`)."""
        return type(self).step is Objective.step

    def end_epoch(self, valid) -> dict[str, float]:
        """Called by the trainer after each epoch with the valid split (an
        ``ImageSplit``/``TextSplit``); returns metrics for the epoch's row.
        Nothing by default."""
        return {}

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The objective's state besides the model's and guide's (baselines,
        running moments), for checkpoints."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("model.", "guide."))}

    def load_own_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("model.", "guide."))]
        if missing or unexpected:
            raise RuntimeError(f"objective state does not fit: missing {missing}, unexpected {unexpected}")

