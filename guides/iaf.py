"""The diagonal-Gaussian guide followed by inverse autoregressive flow steps
(Kingma et al. 2016), conditioned on the datapoint::

    h = MLP_phi(x),  (mu, s) = linear(h),  z_0 ~ N(mu, diag softplus(s)^2 + 1e-4)
    z_t = m_t(z_{t-1}, h) + sigma_t(z_{t-1}, h) * z_{t-1},   t = 1..T

with ``(m_t, sigma_t)`` a MADE network of ``z_{t-1}`` (output ``d`` sees the
inputs before ``d`` only, in the natural order) and of the context ``h``, so
each step's Jacobian is triangular; the order is reversed between steps, as
Kingma et al. do, so that after two steps every ``z_T,d`` depends on every
``z_0,d'``::

    log q(z_T | x) = log N(z_0 | mu, sigma) - sum_t sum_d log sigma_t,d

Built from Pyro's ``ConditionalAffineAutoregressive`` transforms (their
stable variant, ``sigma = sigmoid(.)``-gated).  Sampling is one pass per
step; the density of a sample the guide drew is read from the transforms'
cache, never by inverting the flow.
"""
from __future__ import annotations

import math
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive, Permute
from pyro.nn import ConditionalAutoRegressiveNN
from torch.nn.functional import softplus

from guides.normal import MIN_SCALE
from pyro_vae.contract import DistributionGuide
from pyro_vae.nn import Activation, mlp
from pyro_vae.registry import GUIDES


@GUIDES.register("iaf")
class IAFGuide(DistributionGuide):
    """Diagonal Gaussian q(z_0|x) then inverse autoregressive flow steps conditioned on x (Kingma et al. 2016)."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        hidden: list[int] = [200, 200],
        activation: Activation = "tanh",
        flows: int = 2,
        context_dim: int = 100,
        flow_hidden: list[int] = [100],
    ):
        """
        :param flows: ``T``, the flow steps.
        :param context_dim: width of ``h``, the encoder's context for the flow.
        :param flow_hidden: hidden widths of each step's MADE network.
        """
        super().__init__()
        self.encoder = mlp(math.prod(event_shape), hidden, context_dim, activation)
        self.gaussian = torch.nn.Linear(context_dim, 2 * latent_dim)
        # each MADE in the natural order (Pyro's default draws a random one, with which a reversal
        # between steps can leave some z_T,d independent of some z_0,d'), reversed between steps
        natural = torch.arange(latent_dim)
        self.flows = torch.nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(latent_dim, context_dim, flow_hidden, permutation=natural), stable=True)
            for _ in range(flows))
        self.register_buffer("reverse", natural.flip(0))

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(z | x)`` for the batch ``x``: batch shape ``[B]``, event ``[D]``."""
        h = torch.tanh(self.encoder(x.reshape(x.shape[0], -1)))
        loc, raw_scale = self.gaussian(h).chunk(2, dim=-1)
        base = dist.Normal(loc, softplus(raw_scale) + MIN_SCALE).to_event(1)
        transforms = []
        for i, flow in enumerate(self.flows):
            if i:
                transforms.append(Permute(self.reverse))
            transforms.append(flow.condition(h))
        return dist.TransformedDistribution(base, transforms)
