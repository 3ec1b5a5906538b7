"""The point-estimate guide: the model becomes a deterministic autoencoder::

    q(z | x) = delta(z - f_phi(x)),   f_phi an MLP encoder

With it every ELBO objective maximises ``log p(x | f(x)) + log p(f(x))``, since
``log q = 0`` at the guide's own value: the reconstruction plus the prior's
log-density as a penalty on the codes (``N(0, I)``: ``||z||^2 / 2``, an L2
penalty).  That is a MAP objective, not a bound on ``log p(x)``: a point mass
has no density, so the ELBO's entropy term is minus infinity and the
importance-sampled log-likelihood has no proposal to divide by.  The
evaluator refuses it (:func:`pyro_vae.experiment.require_guide_density`);
a generative model comes from fitting a density to the codes afterwards
(prior ``gmm_ex_post``).
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from pyro_vae.contract import DistributionGuide
from pyro_vae.nn import Activation, mlp
from pyro_vae.registry import GUIDES


@GUIDES.register("delta")
class DeltaGuide(DistributionGuide):
    """MLP encoder to a point estimate z = f(x) (a deterministic autoencoder; no density, so no IS evaluation)."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        hidden: list[int] = [200, 200],
        activation: Activation = "tanh",
    ):
        super().__init__()
        self.encoder = mlp(math.prod(event_shape), hidden, latent_dim, activation)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(z | x) = delta(z - f(x))``: batch shape ``[B]``, event ``[D]``."""
        return dist.Delta(self.encoder(x.reshape(x.shape[0], -1))).to_event(1)
