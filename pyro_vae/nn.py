"""Small neural-network helpers shared by the catalogue's models and guides."""
from __future__ import annotations

from typing import Literal, Sequence

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
