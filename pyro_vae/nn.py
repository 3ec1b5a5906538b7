"""Small neural-network helpers shared by the catalogue's models and guides."""
from __future__ import annotations

from typing import Any, Literal, Sequence

from pyro.poutine.runtime import am_i_wrapped
from pyro.poutine.util import is_validation_enabled
from pyro.nn import PyroModule
from torch import nn

Activation = Literal["tanh", "relu", "elu", "softplus", "leaky_relu", "gelu"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
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
