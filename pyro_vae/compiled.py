"""``train.compile`` and ``eval.compile``: an objective's loss, or the
evaluator's log weights, through :func:`torch.compile`, whole.  (The
trainer compiles more than the loss where it can: the whole step, in
:mod:`pyro_vae.compiled_step`, on :class:`CompiledCall`; the compiled loss
is its fallback.)

For the contract's one-latent parts the trace core builds the traces without
Pyro's handlers (:func:`pyro_vae.traces.direct_traces`), so an objective's
``forward`` -- the guide's and model's networks, their distributions, the
traces, the log-densities and the loss -- is tensor code that TorchDynamo
captures as one graph (``fullgraph=True``).  Inductor fuses its elementwise
work and AOTAutograd its backward's, and the step sheds the Python overhead
of each eager operation and distribution object.  The objective's
``forward`` is replaced on the instance, so parameters, ``state_dict`` keys
and checkpoints do not change.

``eval.compile`` compiles the IS evaluator's chunk the same way
(:class:`CompiledCall` around :func:`~pyro_vae.traces.log_importance_weights`,
called without gradients): the networks' and densities' elementwise passes,
those over the ``[chunk, B, dim(x)]`` logits included, fuse into a few
loops, leaving the matrix products most of the time.

These calls of an objective run its eager ``forward``:

- calls without gradients (the trainer's ``prepare``, which also does each
  objective's first-use work: the plate nesting, the one-latent-site check);
- calls under Pyro's validation (the trainer validates each epoch's first
  step): the distributions' argument checks cannot be traced;
- every call, once capturing has failed: an objective or part whose traces
  are Pyro's (``tracegraph_elbo`` runs Pyro's ELBO, a part with its own
  ``forward`` runs Pyro's handlers), no C++ compiler for
  Inductor, or, before torch 2.14, a part whose distribution calls torch's
  ``expand`` (Dynamo 2.11 cannot trace its ``self.__new__(type(self))``;
  the trace core and the catalogue's priors expand without it).  One
  warning names the reason.  (Other errors -- a bad batch,
  out of memory -- are raised as they are.)

Pyro's validation is on by default: outside the trainer, compiled calls
need ``pyro.validation_enabled(False)``.

Random draws inside the compiled graph are torch's own (Inductor's
``fallback_random``): a compiled step draws what the eager step draws from
the same generator state, so its loss and gradients are the eager ones to
float rounding (tested), and a compiled run follows the eager run's draws.
Inductor's own CPU generator (a Philox draw per element) was also slow:
~350 us more than torch's for the 100 x 50 draw of a Burda training step,
3-4% of the step.  Every compiled call also runs
:class:`~pyro_vae.inductor_passes.BiasIntoPointwise` (a layer's bias added
in the activation's loop on the CPU, not copied into the product's output).
"""
from __future__ import annotations

import logging
import types
from typing import Any, Callable, Optional

import pyro.distributions.util
import pyro.poutine.util
import torch
import torch._dynamo.config
import torch._dynamo.exc
import torch._functorch.config

from pyro_vae.inductor_passes import BiasIntoPointwise

log = logging.getLogger("pyro_vae")

# capture and Inductor failures; with fullgraph=True the recompile limit (8 graphs per code object:
# see with_own_code) raises FailOnRecompileLimitHit, a plain Exception
COMPILER_FAILURES = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


def with_own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a function or bound method) with a copy of its code object.
    Dynamo keeps a function's graphs on its code object, at most 8
    (``recompile_limit``): one trainer's step takes up to three (the first
    step, the step counter made a graph input, a short last batch), so
    without a code object of its own the third trainer of a process could
    fall back to eager.  With one, each :class:`CompiledCall` has its own 8."""
    if isinstance(fn, types.MethodType):
        return types.MethodType(with_own_code(fn.__func__), fn.__self__)
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


class CompiledCall:
    """``fn`` through :func:`torch.compile` whole (``fullgraph``, torch's own
    generator), where ``compiles()`` allows it and Pyro's validation is off;
    ``eager`` (by default ``fn`` itself, uncompiled) otherwise, and for good
    once capturing or compiling has failed (one warning, naming ``what``)."""

    def __init__(self, fn: Callable[..., Any], what: str, compiles: Callable[[], bool] = lambda: True,
                 eager: Optional[Callable[..., Any]] = None):
        self.eager, self.what, self.compiles = eager or fn, what, compiles
        self.compiled: Callable[..., Any] | None = torch.compile(
            with_own_code(fn), fullgraph=True,
            options={"fallback_random": True, "post_grad_custom_post_pass": BiasIntoPointwise()})
        # the step counter (annealing, capacity schedules) a graph input, not a constant that
        # recompiles each step; torch.autograd.grad traced (the whole training step); a backward
        # compiled now, inside this fallback, not lazily.  (Made once; entering both costs ~10 us a call.)
        self.settings = (torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, trace_autograd_ops=True),
                         torch._functorch.config.patch(force_non_lazy_backward_lowering=True))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (self.compiled is None or not self.compiles() or pyro.distributions.util.is_validation_enabled()
                or pyro.poutine.util.is_validation_enabled()):
            return self.eager(*args, **kwargs)
        try:
            with self.settings[0], self.settings[1]:
                return self.compiled(*args, **kwargs)
        except COMPILER_FAILURES as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning("torch.compile cannot compile %s whole (%s: %s); it runs uncompiled",
                        self.what, type(exc).__name__, message)
            self.compiled = None
        return self.eager(*args, **kwargs)


class CompiledObjective(CompiledCall):
    """An objective's ``forward``, compiled on its first call with gradients,
    or its eager ``forward`` where the module docstring says."""

    def __init__(self, objective: torch.nn.Module):
        self.objective = objective
        super().__init__(type(objective).forward.__get__(objective), f"objective {type(objective).__name__}",
                         torch.is_grad_enabled)


def compile_objective(objective: torch.nn.Module) -> CompiledObjective:
    """Route ``objective``'s ``forward`` through :class:`CompiledObjective` (once)."""
    current = objective.__dict__.get("forward")
    if not isinstance(current, CompiledObjective):
        current = objective.forward = CompiledObjective(objective)
    return current
