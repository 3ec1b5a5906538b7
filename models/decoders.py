"""Decoders p(x | z) for any prior p(z)::

    z ~ p(z)                                   (the prior: N(0, I), Bernoulli, ...)
    x | z ~ prod_d Lik(x_d | l_d),   l = f_theta(z)

with the likelihood ``Lik`` a swappable part (``likelihood``):

- ``bernoulli`` (binary pixels): ``Bernoulli(sigmoid(l))``;
- ``continuous_bernoulli`` (gray levels in [0, 1], Loaiza-Ganem & Cunningham
  2019): ``p(x | l) = C(l) sigmoid(l)^x sigmoid(-l)^(1-x)``, ``C`` its
  normalising constant on [0, 1];
- ``gaussian`` (gray levels): ``N(sigmoid(l), s^2)``, ``s`` fixed
  (``scale``: the squared-error reconstruction, ``-log p = |x - mean|^2 /
  (2 s^2) + const``) or learned per pixel (``learn_scale``).

``f_theta`` is an MLP emitting one logit per pixel (``mlp``), or one affine
map (``linear``: the one-layer sigmoid belief net of NVIL, MuProp and REBAR,
``logits = W z + b``).  What kind of latent the model has is the prior's
business: the same decoder with prior ``standard_normal`` and guide
``normal`` is the Gaussian-latent VAE (Kingma & Welling 2014; Burda et al.
2015), and with prior ``bernoulli`` and guide ``bernoulli`` a binary-latent VAE.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import pyro.distributions as dist
import torch

from pyro_vae.contract import LatentVariableModel
from pyro_vae.distributions import BernoulliVector
from pyro_vae.errors import ConfigError
from pyro_vae.nn import Activation, mlp
from pyro_vae.registry import MODELS


Likelihood = Literal["bernoulli", "continuous_bernoulli", "gaussian"]


@MODELS.register("mlp")
class MLPDecoder(LatentVariableModel):
    """MLP decoder: p(x|z) = Lik(MLP(z)), Bernoulli (default), continuous Bernoulli or Gaussian pixels."""

    def __init__(
        self,
        prior: Callable[[int], dist.TorchDistribution],
        event_shape: tuple[int, ...],
        latent_dim: int = 50,
        hidden: list[int] = [200, 200],
        activation: Activation = "tanh",
        likelihood: Likelihood = "bernoulli",
        scale: float = 0.1,
        learn_scale: bool = False,
    ):
        """
        :param likelihood: ``bernoulli``, ``continuous_bernoulli`` or ``gaussian``.
        :param scale: the Gaussian's standard deviation (its starting value when learned).
        :param learn_scale: learn one Gaussian standard deviation per pixel.
        """
        super().__init__()
        if scale <= 0:
            raise ConfigError(f"model.scale must be > 0 (it is {scale})")
        if likelihood != "gaussian" and (learn_scale or scale != 0.1):
            raise ConfigError(f"model.scale and model.learn_scale are options of the gaussian likelihood, "
                              f"not of {likelihood!r}")
        self.prior = prior
        self.event_shape = tuple(event_shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.decoder = mlp(latent_dim, hidden, math.prod(self.event_shape), activation)
        if likelihood == "gaussian":  # (other likelihoods keep the state of checkpoints written before this option)
            log_scale = torch.full((math.prod(self.event_shape),), math.log(scale))
            if learn_scale:
                self.log_scale = torch.nn.Parameter(log_scale)
            else:
                self.register_buffer("log_scale", log_scale)

    def pixels(self, logits: torch.Tensor) -> dist.TorchDistribution:
        """The likelihood of the pixels given the decoder's outputs ``l``: event shape ``[D]``."""
        if self.likelihood == "bernoulli":
            return BernoulliVector(logits=logits)
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=logits).to_event(1)
        return dist.Normal(torch.sigmoid(logits), self.log_scale.exp()).to_event(1)

    def observation(self, z: torch.Tensor, x: Optional[torch.Tensor] = None) -> dist.TorchDistribution:
        """``p(x | z)``, the pixels' likelihood at the decoder's outputs."""
        return self.pixels(self.decoder(z))

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """Images flattened to ``[B, D]``."""
        return x.reshape(x.shape[0], -1)


MODELS.rename("gaussian", "mlp")  # its latent was always the prior's business


@MODELS.register("linear")
def linear(prior: Callable[[int], dist.TorchDistribution], event_shape: tuple[int, ...],
           latent_dim: int = 200) -> MLPDecoder:
    """Linear decoder (one-layer sigmoid belief net): p(x|z) = Bern(sigmoid(W z + b))."""
    return MLPDecoder(prior, event_shape, latent_dim, hidden=[])
