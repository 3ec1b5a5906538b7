"""Small neural-network helpers shared by the catalogue's models and guides."""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pyro.poutine.runtime import am_i_wrapped
from pyro.poutine.util import is_validation_enabled
from pyro.nn import PyroModule
from torch import nn

Activation = Literal["tanh", "relu", "elu", "softplus", "leaky_relu", "gelu"]


def sigmoid_tanh(a: torch.Tensor) -> torch.Tensor:
    """``tanh(a) = 2 sigmoid(2a) - 1``: one new tensor, three passes in place.

    On the CPU torch's ``tanh`` (a vectorised SLEEF polynomial) runs at
    ~190 Melem/s a thread on this project's AMD EPYC against ~700 for its
    ``sigmoid``: this form takes ~2.4x less time on large tensors, 1.09x on
    a whole importance-sampling chunk of the Burda decoder (two tanh layers
    of 200 units per sample).  It differs from ``torch.tanh`` by float32
    rounding of values near 1/2: an absolute ~2e-7 (1.8e-7 measured,
    torch's 3e-8), so it is not relatively accurate for |a| below ~1e-6,
    where no activation needs it."""
    return a.mul(2).sigmoid_().mul_(2).sub_(1)


class SigmoidTanh(torch.autograd.Function):
    """``2 sigmoid(2a) - 1`` with the gradient ``g (1 - tanh(a)^2)`` from the
    output (torch's ``tanh_backward``, differentiable in turn)."""

    @staticmethod
    def forward(a: torch.Tensor) -> torch.Tensor:
        # out of place: Inductor fuses it into one kernel all the same, and torch 2.11's saved the
        # in-place chain's output wrongly (a zero gradient, seen on the GPU machine's torch)
        return 2 * torch.sigmoid(2 * a) - 1

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, output)


class Tanh(nn.Module):
    """``nn.Tanh``, by :func:`sigmoid_tanh` where that is faster: on the CPU
    without gradients (evaluation), and inside ``torch.compile`` (where
    :class:`SigmoidTanh` is traced into the graph: ~0.09 ms less per tanh
    layer of a batch of 100 x 200, forward and backward).  ``torch.tanh``
    elsewhere: a GPU's ``tanh`` is one fast kernel, and an eager
    ``autograd.Function`` costs ~60 us a call in Python, more than it saves
    on a training batch."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.device.type != "cpu" or (a.requires_grad and not torch.compiler.is_compiling()):
            return torch.tanh(a)
        return SigmoidTanh.apply(a) if a.requires_grad else sigmoid_tanh(a)


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def mlp(in_features: int, hidden: Sequence[int], out_features: int, activation: Activation) -> nn.Sequential:
    """``Linear -> act -> ... -> Linear``: an MLP with ``hidden`` layer widths
    and no activation on the output.  Works on any leading batch shape."""
    widths = [in_features, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), _ACTIVATIONS[activation]()]
    layers.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*layers)


class PartModule(PyroModule):
    """The base of the catalogue's models, guides and priors: a
    :class:`~pyro.nn.PyroModule` whose plain :class:`torch.nn.Module`
    children (its networks) are returned as they are.

    A ``PyroModule`` turns every access to such a child inside its
    ``forward`` into ``pyro.module(name, child)``: one ``param`` message per
    parameter, each step, about 0.6 ms of a 7 ms training step of the Burda
    model.  The engine optimises the modules' own parameters with
    :mod:`torch.optim` and keeps no parameter store, so those messages do
    nothing here.  ``PyroParam`` and ``PyroSample`` attributes and
    ``PyroModule`` children behave as in any ``PyroModule``; a part that
    wants its networks' parameters seen by Pyro's handlers (``poutine.lift``,
    say) subclasses ``PyroModule`` instead.

    A call enters Pyro's module context (which caches ``PyroParam`` and
    ``PyroSample`` values for the call's length, scopes module-local
    parameters and sends a ``param`` message for each parameter of a
    ``PyroModule`` inside the part) where the part or a ``PyroModule``
    inside it has ``PyroParam`` or ``PyroSample`` attributes, where a Pyro
    handler is active (``poutine.trace`` sees the ``param`` sites), and
    whenever Pyro's validation is on (the trainer validates each epoch's
    first step; then Pyro also refuses a global ``pyro.param`` inside a
    part, as module-local parameters require).  Otherwise the call is
    torch's plain module call: the context did nothing there, cost ~30-80
    us a call, and read Pyro's settings through ``importlib``, which
    ``torch.compile`` cannot trace."""

    def __getattr__(self, name: str) -> Any:
        child = self.__dict__["_modules"].get(name)
        if child is not None and not isinstance(child, PyroModule):
            return child
        return super().__getattr__(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if am_i_wrapped() or is_validation_enabled() or self.uses_pyro_attributes():
            return super().__call__(*args, **kwargs)
        return nn.Module.__call__(self, *args, **kwargs)

    def uses_pyro_attributes(self) -> bool:
        """Whether this part or a ``PyroModule`` inside it has ``PyroParam`` or
        ``PyroSample`` attributes."""
        return any(m.__dict__.get("_pyro_params") or m.__dict__.get("_pyro_samples")
                   for m in self.modules() if isinstance(m, PyroModule))
