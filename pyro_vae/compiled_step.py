"""``train.compile``'s whole training step: the objective's loss, its
gradient, the finiteness check and the guarded Adam update, in one graph.

Compiling the objective's ``forward`` alone (:mod:`pyro_vae.compiled`) leaves
a step of separate calls: the compiled forward, the autograd engine running
the compiled backward and accumulating each ``.grad``, the finiteness check
(:func:`~pyro_vae.divergence.count_non_finite`), a host sync on its verdict,
and :class:`torch.optim.Adam`'s Python around its fused kernel.  Here
TorchDynamo captures all of it -- ``torch.autograd.grad`` traced into the
graph (``trace_autograd_ops``) -- so AOTAutograd and Inductor see one
function from the batch to the updated parameters, and Inductor fuses the
update with the check.  The update is taken only where everything is finite,
as :class:`~pyro_vae.divergence.GuardedOptimizer` takes it::

    ok    = isfinite(loss) and all(isfinite(g) for g in grads)
    t'    = t + ok
    m'    = ok ? m + (1 - beta1) (g - m)       : m
    v'    = ok ? beta2 v + (1 - beta2) g^2     : v
    theta' = ok ? theta - lr / (1 - beta1^t') * m' / (sqrt(v') / sqrt(1 - beta2^t') + eps) : theta

Adam (Kingma & Ba, 2015) as torch's fused kernel computes it, its scalar
factors in float64, on the optimizer's own state (``exp_avg``,
``exp_avg_sq``, ``step``): checkpoints, learning-rate schedules (the rates
enter as a tensor, so a new rate does not recompile) and the eager steps of
the same run share it.  From the same generator state the whole step draws
what the eager step draws; its loss, metrics and updated state are the eager
ones to float rounding (tested).

Where the whole step does not apply the trainer steps the objective as
before, with its ``forward`` compiled (:func:`whole_step_unsupported` says
why): several processes (the gradients are all-reduced between the backward and the
update), or an optimizer other than fused Adam without weight decay.  Steps
under Pyro's validation (each epoch's first) and an objective's own steps
(:meth:`~pyro_vae.objectives.Objective.takes_plain_step`: aggressive encoder
updates) run the eager guarded step, and
a capture or compiler failure falls back to it for good, with one warning.
"""
from __future__ import annotations

from typing import Optional

import pyro
import torch

from pyro_vae.compiled import CompiledCall
from pyro_vae.divergence import GuardedOptimizer
from pyro_vae.objectives import Objective


def whole_step_unsupported(guard: GuardedOptimizer) -> Optional[str]:
    """Why training through ``guard`` cannot take the whole compiled step
    (``None``: it can, for each step the objective takes plainly)."""
    if guard.ranks.active:
        return "several processes all-reduce the gradients between the backward and the update"
    optimizer = guard.optimizer
    if type(optimizer) is not torch.optim.Adam:
        return f"the optimizer is {type(optimizer).__name__}, not Adam"
    for group in optimizer.param_groups:
        if not group["fused"] or group["amsgrad"] or group["maximize"] or group["weight_decay"] \
                or group.get("decoupled_weight_decay") or group["differentiable"]:
            return "the optimizer is not fused Adam without weight decay, AMSGrad or maximize"
    return None


def guarded_adam_(params: list[torch.Tensor], grads: list[torch.Tensor], state: list[dict[str, torch.Tensor]],
                  lr: torch.Tensor, beta1: float, beta2: float, eps: float, ok: torch.Tensor) -> None:
    """Adam's update of ``params`` in place (the module docstring's
    formulas), with their ``state`` (``step``, ``exp_avg``, ``exp_avg_sq``)
    advanced only where ``ok``; ``lr`` a float64 scalar tensor.

    Each parameter's two scalar factors, lr / (1 - beta1^t) and
    sqrt(1 - beta2^t), are float64 powers; stacked into one tensor (Inductor
    makes a concatenation of more than 8 inputs a buffer of its own) they
    are computed once, where Inductor would otherwise inline them into
    the update's loop and take the powers once per vector: 1.6x slower than
    the whole update here, and slower than torch's fused Adam."""
    steps = [s["step"] + ok.to(s["step"].dtype) for s in state]
    t = [step.to(torch.float64) for step in steps]
    factors = torch.stack([lr / (1 - beta1 ** t_) for t_ in t] + [torch.sqrt(1 - beta2 ** t_) for t_ in t])
    for i, (param, grad, s) in enumerate(zip(params, grads, state)):
        step_size, root_correction = factors[i].to(param.dtype), factors[len(params) + i].to(param.dtype)
        exp_avg = torch.where(ok, torch.lerp(s["exp_avg"], grad, 1 - beta1), s["exp_avg"])
        exp_avg_sq = torch.where(ok, s["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad, s["exp_avg_sq"])
        updated = param - step_size * exp_avg / (exp_avg_sq.sqrt() / root_correction + eps)
        param.copy_(torch.where(ok, updated, param))
        s["step"].copy_(steps[i])
        s["exp_avg"].copy_(exp_avg)
        s["exp_avg_sq"].copy_(exp_avg_sq)


class CompiledTrainStep:
    """The objective's guarded Adam step, compiled whole (the module
    docstring).  ``step(x, validate)`` returns the detached loss and leaves
    ``guard.skipped`` and ``guard.stop_any`` as the guarded eager step does."""

    def __init__(self, objective: Objective, guard: GuardedOptimizer):
        self.objective, self.guard, self.optimizer = objective, guard, guard.optimizer
        self.groups = [[p for p in group["params"] if p.requires_grad] for group in self.optimizer.param_groups]
        self.params = [p for group in self.groups for p in group]  # (the gradients' order)
        self.lr_values: list[float] = []
        self.lrs = torch.zeros(len(self.groups), dtype=torch.float64,
                               device=self.groups[0][0].device if self.groups[0] else None)
        self.call = CompiledCall(self._update, f"the training step of {type(objective).__name__}",
                                 torch.is_grad_enabled, eager=self._guarded_update)

    def _made_state(self) -> list[list[dict[str, torch.Tensor]]]:
        """The optimizer's state of each parameter, made as fused Adam makes it on its first step
        (its step count a float32 scalar on the parameter's device); unlike torch, also for a
        parameter that never gets a gradient (its state then stays at step 0)."""
        for param in self.params:
            state = self.optimizer.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return [[self.optimizer.state[p] for p in group] for group in self.groups]

    def _update(self, x: torch.Tensor, lrs: torch.Tensor, states: list[list[dict[str, torch.Tensor]]],
                constants: list[tuple[float, float, float]]
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[Optional[torch.Tensor], ...]]:
        """The traced step: the eager ``forward`` (not a compiled one inside the graph), the
        gradient, the check and the update; returns the detached loss, whether it updated, and
        the gradients (buffers the update needed anyway: a skipped step leaves them in ``.grad``,
        where the trainer looks for the culprit).
        The groups' rates come as a tensor, their betas and eps as constants: nothing reads
        the optimizer's ``param_groups`` in the graph, whose guards would then take each rate
        as a constant and a schedule's every new rate would compile a new graph."""
        objective = self.objective
        loss = type(objective).forward(objective, x)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        ok = torch.isfinite(loss)
        for grad in grads:
            if grad is not None:
                ok = ok & torch.isfinite(grad).all()
        with torch.no_grad():
            start = 0
            for i, (group, state, (beta1, beta2, eps)) in enumerate(zip(self.groups, states, constants)):
                grad_of = grads[start: start + len(group)]
                start += len(group)
                used = [k for k, grad in enumerate(grad_of) if grad is not None]  # Adam skips a parameter without one
                if used:
                    guarded_adam_([group[k] for k in used], [grad_of[k] for k in used], [state[k] for k in used],
                                  lrs[i], beta1, beta2, eps, ok)
        return loss.detach(), ok, grads

    def _guarded_update(self, x: torch.Tensor, lrs: torch.Tensor, states: list[list[dict[str, torch.Tensor]]],
                        constants: list[tuple[float, float, float]]) -> tuple[torch.Tensor, bool, None]:
        """The eager route: the objective's own step through the guard (fused Adam; ``.grad`` set)."""
        loss = self.objective.step(x, self.guard)
        return loss, not self.guard.skipped, None

    def _learning_rates(self) -> torch.Tensor:
        """The groups' current rates (a schedule moves them) as the graph's tensor input."""
        values = [group["lr"] for group in self.optimizer.param_groups]
        if values != self.lr_values:
            self.lrs.copy_(torch.tensor(values, dtype=torch.float64))
            self.lr_values = values
        return self.lrs

    def step(self, x: torch.Tensor, validate: bool = False) -> torch.Tensor:
        with pyro.validation_enabled(validate):
            if not self.objective.takes_plain_step():  # (its own step, e.g. aggressive encoder updates)
                return self.objective.step(x, self.guard)
            constants = [(*group["betas"], group["eps"]) for group in self.optimizer.param_groups]
            loss, ok, grads = self.call(x, self._learning_rates(), self._made_state(), constants)
        self.guard.skipped = not bool(ok)
        if self.guard.skipped and grads is not None:
            for param, grad in zip(self.params, grads):
                param.grad = grad
        self.guard.stop_any = self.guard.stop
        return loss
