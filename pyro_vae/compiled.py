"""``train.compile``: the parts' networks run through :func:`torch.compile`.

What is compiled is the forward of every plain :class:`torch.nn.Module`
child of the model's and guide's ``PyroModule`` s (the encoder and decoder
MLPs): the tensor code, which TorchDynamo traces without graph breaks.
Pyro's sample statements and the objective stay eager; the math is the
same (the loss and the gradients agree with the eager path to float
rounding, tested).  Each network's compiled forward replaces its
``forward`` as an instance attribute, so parameters, ``state_dict`` keys
and checkpoints do not change.

The fallback: where compiling fails on first use (no C++ compiler for
Inductor on the CPU, an operator Inductor does not lower), the network goes
back to its eager forward for good, with one warning.  On this project's CPU
machine the compiled Burda networks were slower than eager ones (their time
is in matrix products that MKL already runs near peak), so the switch is
off by default; it is meant for GPUs, where fusing the elementwise work
counts.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from pyro.nn import PyroModule

log = logging.getLogger("pyro_vae")


class CompiledForward:
    """A network's ``forward`` compiled on first call, or its eager forward
    once compiling has failed."""

    def __init__(self, network: torch.nn.Module, name: str):
        self.network, self.name = network, name
        self.compiled: Callable[..., Any] | None = torch.compile(type(network).forward.__get__(network))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 -- any compiler failure falls back to eager
                log.warning("torch.compile failed for %s (%s: %s); it runs uncompiled", self.name,
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.compiled = None
        return type(self.network).forward(self.network, *args, **kwargs)


def networks(*parts: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The plain ``nn.Module`` children of every ``PyroModule`` in ``parts``,
    with their names: the networks a model or guide calls."""
    found = []
    for part in parts:
        for prefix, module in part.named_modules():
            if isinstance(module, PyroModule):
                found += [(f"{prefix}.{name}".lstrip("."), child) for name, child in module.named_children()
                          if not isinstance(child, PyroModule)]
    return found


def compile_networks(model: torch.nn.Module, guide: torch.nn.Module) -> list[str]:
    """Route each network of the model and guide through :class:`CompiledForward`;
    returns their names (``model.decoder``, ``guide.encoder``)."""
    names = []
    for root, part in (("model", model), ("guide", guide)):
        for name, network in networks(part):
            if not isinstance(network.__dict__.get("forward"), CompiledForward):
                network.forward = CompiledForward(network, f"{root}.{name}")
            names.append(f"{root}.{name}")
    return names
