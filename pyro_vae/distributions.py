"""Distributions the catalogue needs and Pyro does not ship: a Bernoulli
likelihood written for speed in the IS hot path, and a wrapper that switches
the reparameterization trick off."""
from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import register_kl
from torch.nn.functional import logsigmoid, softplus


class BernoulliVector(dist.Independent):
    """Independent Bernoullis over the last dim, given logits ``l``::

        log p(x | l) = sum_d [x_d l_d - softplus(l_d)]

    Equal to ``Bernoulli(logits=l).to_event(1)``, but ``log_prob`` contracts
    ``x`` against ``l`` with one einsum instead of broadcasting ``x`` to the
    logits' shape: with ``K`` importance samples the logits are ``[K, B, D]``
    while the data are ``[B, D]``.
    """

    def __init__(self, logits: torch.Tensor, validate_args=None):
        super().__init__(dist.Bernoulli(logits=logits, validate_args=validate_args), 1, validate_args=validate_args)

    @property
    def logits(self) -> torch.Tensor:
        return self.base_dist.logits

    def expand(self, batch_shape, _instance=None):
        return BernoulliVector(self.logits.expand(torch.Size(batch_shape) + self.event_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits
        if value.dim() < logits.dim() and logits.shape[logits.dim() - value.dim():] == value.shape:
            # data without the sample dims: contract without broadcasting x to the logits
            samples = logits.reshape(-1, *value.shape)  # [S, *batch, D]
            fit = torch.einsum("s...d,...d->s...", samples, value).reshape(logits.shape[:-1])
        else:
            fit = (value * logits).sum(-1)
        return fit - softplus(logits).sum(-1)


class WithoutRsample(dist.Independent):
    """A distribution drawn by ``sample`` alone (``has_rsample = False``), built
    as ``WithoutRsample(fn, 0)``: objectives then reach ``fn``'s parameters
    through the score function only.  It exists to measure what the
    reparameterization trick buys (``scripts/gradient_variance.py``)."""

    has_rsample = False


class ScoreFunctionOnly(Messenger):
    """Wraps every latent site's distribution in :class:`WithoutRsample`::

        guide = ScoreFunctionOnly()(guide)
    """

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] and not site_is_subsample(msg) and not isinstance(msg["fn"], WithoutRsample):
            msg["fn"] = WithoutRsample(msg["fn"], 0)


@register_kl(dist.Bernoulli, dist.Bernoulli)
def _kl_bernoulli_logits(q: dist.Bernoulli, p: dist.Bernoulli) -> torch.Tensor:
    """``KL(Ber(sigmoid(a)) || Ber(sigmoid(b)))`` from the logits::

        sigmoid(a) [log sigmoid(a) - log sigmoid(b)] + sigmoid(-a) [log sigmoid(-a) - log sigmoid(-b)]

    torch's version works from probabilities and returns inf once a logit
    saturates (``|b| > ~17`` in float32 rounds ``sigmoid(b)`` to 0 or 1), as a
    learned prior's logits do in training; this one is finite for finite logits."""
    a, b = q.logits, p.logits
    return torch.sigmoid(a) * (logsigmoid(a) - logsigmoid(b)) + torch.sigmoid(-a) * (logsigmoid(-a) - logsigmoid(-b))
