"""The LSTM encoder of the sentence VAE::

    q(z | x) = N(mu(h), diag sigma(h)^2),   h = the LSTM's final state over x's words

``x`` is ``[B, T]`` token ids right-padded with ``pad_id``; the sequences are
packed by length, so the final state is the one after each sentence's own
last word (padding never reaches it), and with ``bidirectional`` the backward
direction starts there too.  sigma = softplus(.) + 1e-4, as for ``normal``.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus
from torch.nn.utils.rnn import pack_padded_sequence

from guides.normal import MIN_SCALE
from pyro_vae.contract import DistributionGuide
from pyro_vae.registry import GUIDES


@GUIDES.register("lstm")
class LSTMGuide(DistributionGuide):
    """LSTM encoder (optionally bidirectional) of the sentence to a diagonal Normal q(z|x)."""

    def __init__(self, vocab_size: int, pad_id: int, latent_dim: int, embedding: int = 256, hidden: int = 256,
                 bidirectional: bool = False):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embedding, padding_idx=pad_id)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 2 * latent_dim)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(z | x)`` for the ids ``x`` ``[B, T]``: batch shape ``[B]``, event ``[D]``."""
        lengths = (x != self.pad_id).sum(1).clamp_min(1)
        packed = pack_padded_sequence(self.embed(x), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # [directions, B, H], in the batch's own order
        loc, raw_scale = self.head(h.transpose(0, 1).reshape(x.shape[0], -1)).chunk(2, -1)
        return dist.Normal(loc, softplus(raw_scale) + MIN_SCALE).to_event(1)
