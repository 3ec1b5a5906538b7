"""The site contract in code: its names, and the model and guide that keep it
with one latent site.

Every site of a model and guide lies inside ``pyro.plate(DATA_PLATE, B)``;
the model observes the data at :data:`OBSERVED_SITE`.  The common case is
one latent site ``"z"``::

    z ~ p(z)              model.prior(B):        batch [B], the latent as event
    x | z ~ p(x | z)      model.observation(z, x), observed at model.observed(x)
    z ~ q(z | x)          guide.distribution(x): batch [B], the latent as event

:class:`LatentVariableModel` and :class:`DistributionGuide` write these as
Pyro programs once, and because their ``forward`` is fixed, the trace core
(:func:`pyro_vae.traces.guide_and_model_traces`) may build the traces Pyro
would record from the three distributions alone, without running Pyro's
handler stack (see there).  A part that needs another program overrides
``forward``; its traces are then always Pyro's.
"""
from __future__ import annotations

from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.nn import PartModule

DATA_PLATE = "data"  # every site of a model and guide lies inside pyro.plate(DATA_PLATE, B)
OBSERVED_SITE = "x"  # the model observes the data here
LATENT_SITE = "z"  # the one latent site of a LatentVariableModel
PARTICLE_PLATE = "_particles"  # the engine's plate of K samples per datapoint


class LatentVariableModel(PartModule):
    """``p(x, z) = p(z) p(x | z)`` with one latent site: subclasses set
    ``prior`` (a callable ``B -> p(z)``) and implement :meth:`observation`."""

    prior: Callable[[int], dist.TorchDistribution]
    direct_traces: bool = True  # may the trace core build this model's traces itself (train.direct_traces)

    def observation(self, z: torch.Tensor, x: Optional[torch.Tensor]) -> dist.TorchDistribution:
        """``p(x | z)`` for latents ``z`` of shape ``[*particles, B, *latent]``:
        batch shape ``[*particles, B]``.  ``x`` is the data (``None`` when
        generating), for decoders that read it (teacher forcing, masks)."""
        raise NotImplementedError

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """The data as :meth:`observation`'s value (images: flattened)."""
        return x

    def forward(self, x: Optional[torch.Tensor] = None, batch_size: Optional[int] = None) -> None:
        """Sample ``z`` and observe ``x`` in the data plate; with ``x=None``
        draw ``batch_size`` datapoints from the model."""
        batch_size = x.shape[0] if x is not None else batch_size
        with pyro.plate(DATA_PLATE, batch_size):
            z = pyro.sample(LATENT_SITE, self.prior(batch_size))
            pyro.sample(OBSERVED_SITE, self.observation(z, x), obs=None if x is None else self.observed(x))


class DistributionGuide(PartModule):
    """A guide given by :meth:`distribution`, ``q(z | x)`` for a batch ``x``
    (batch shape ``[B]``, the latent as event shape), sampled at site ``"z"``
    in the data plate.  ``distribution`` is also what the VampPrior
    evaluates at its pseudo-inputs."""

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, batch_size: Optional[int] = None) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            pyro.sample(LATENT_SITE, self.distribution(x))
