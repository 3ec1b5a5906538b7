"""pyro-vae: variational autoencoders as Pyro model/guide pairs.

The engine (this package) trains and evaluates any model/guide pair that keeps
the site contract: latent sites ``"z"`` and observed site ``"x"`` inside
``pyro.plate("data", B)``.  The catalogue of models and guides lives in the
top-level packages :mod:`models` and :mod:`guides`, reached through
:mod:`pyro_vae.registry`.
"""
import pyro

# Parameters live in the modules, never in Pyro's global store: `.to(device)`,
# `state_dict()`, DDP and checkpoints are then plain PyTorch.
pyro.settings.set(module_local_params=True)

__version__ = "0.1.0"
