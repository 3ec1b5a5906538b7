"""The objectives, by name: loss modules with a training context (see
:mod:`pyro_vae.objectives.base`).  Importing this package registers them."""
from pyro_vae.objectives import binary, disentangle, elbo, importance, score  # noqa: F401  (registration)
from pyro_vae.objectives.base import Objective, TrainingContext

__all__ = ["Objective", "TrainingContext"]
