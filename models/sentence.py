"""The sentence VAE (Bowman et al. 2016): an LSTM language model conditioned on z::

    z ~ p(z)                                  (the prior part, N(0, I) by default)
    x_t | z, x_<t ~ Categorical(softmax(W h_t + b)),   h_t = LSTM(h_{t-1}, [e(x_{t-1}); z?])
    h_0 = tanh(A z)?                          (``condition``: ``init``, ``input``, ``both``, or ``none``)

``x`` is the ``[B, T]`` tensor of token ids ``[w_1 .. w_n, <eos>, <pad> ..]``;
the inputs are ``[<bos>, w_1 .. w_n]`` and the log-likelihood
``sum_t log p(x_t | z, x_<t)`` counts the positions ``x != pad`` only (the
mask is applied inside the data plate, so padding never changes a sentence's
score).  ``condition = "none"`` ignores z: the plain LSTM language model of
the same size (the collapse study's baseline).  Word dropout (Bowman et al.)
replaces each input word by ``<unk>`` with probability ``word_dropout``, in
training mode only.  Latent particles (the evaluator's ``[K, B, D]`` z) are
folded into the LSTM's batch.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.contract import LatentVariableModel
from pyro_vae.data.text import BOS, UNK
from pyro_vae.errors import ConfigError
from pyro_vae.registry import MODELS

Condition = Literal["init", "input", "both", "none"]


@MODELS.register("sentence")
class SentenceDecoder(LatentVariableModel):
    """LSTM decoder p(x|z) = prod_t Cat(x_t | LSTM(z, x_<t)), z in its initial state and/or every input."""

    def __init__(
        self,
        prior: Callable[[int], dist.TorchDistribution],
        vocab_size: int,
        pad_id: int,
        latent_dim: int = 32,
        embedding: int = 256,
        hidden: int = 256,
        condition: Condition = "init",
        word_dropout: float = 0.0,
    ):
        """
        :param condition: where z enters: ``init`` (h_0 = tanh(A z), c_0 = 0),
            ``input`` (concatenated to every input embedding), ``both``, or
            ``none`` (a language model: z is drawn and ignored).
        :param word_dropout: probability of replacing an input word by ``<unk>`` while training.
        """
        super().__init__()
        if not 0.0 <= word_dropout < 1.0:
            raise ConfigError(f"model.word_dropout must be in [0, 1) (it is {word_dropout})")
        self.prior, self.pad_id, self.condition, self.word_dropout = prior, pad_id, condition, word_dropout
        self.latent_dim, self.hidden_size = latent_dim, hidden
        self.embed = nn.Embedding(vocab_size, embedding, padding_idx=pad_id)
        z_input = latent_dim if condition in ("input", "both") else 0
        self.lstm = nn.LSTM(embedding + z_input, hidden, batch_first=True)
        if condition in ("init", "both"):
            self.init = nn.Linear(latent_dim, hidden)
        self.out = nn.Linear(hidden, vocab_size)

    @property
    def ignores_latent(self) -> bool:
        """``condition = "none"``: the language model, whose KL falls to 0 by design (no collapse warning)."""
        return self.condition == "none"

    def initial_state(self, z: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(h_0, c_0)`` for ``z`` ``[N, D]``; ``None`` (zeros) when z does not enter the state."""
        if self.condition not in ("init", "both"):
            return None
        h = torch.tanh(self.init(z)).unsqueeze(0)
        return h, torch.zeros_like(h)

    def step_logits(self, z: torch.Tensor, inputs: torch.Tensor, state=None):
        """Logits ``[N, T, V]`` of the next words after ``inputs`` ``[N, T]``
        given ``z`` ``[N, D]``, and the LSTM state after them."""
        embedded = self.embed(inputs)
        if self.condition in ("input", "both"):
            embedded = torch.cat([embedded, z.unsqueeze(1).expand(-1, inputs.shape[1], -1)], -1)
        output, state = self.lstm(embedded, state if state is not None else self.initial_state(z))
        return self.out(output), state

    def logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[..., B, T, V]`` logits of ``x`` ``[B, T]`` under ``z`` ``[..., B, D]`` (teacher forcing)."""
        batch, length = x.shape
        inputs = torch.cat([x.new_full((batch, 1), BOS), x[:, :-1]], 1)
        if self.training and self.word_dropout > 0:
            dropped = torch.rand(inputs.shape, device=x.device) < self.word_dropout
            dropped[:, 0] = False  # <bos> stays
            inputs = torch.where(dropped & (inputs != self.pad_id), torch.full_like(inputs, UNK), inputs)
        lead = z.shape[:-2]
        particles = z.reshape(-1, batch, self.latent_dim).shape[0]
        inputs = inputs.expand(particles, batch, length).reshape(particles * batch, length)
        logits, _ = self.step_logits(z.reshape(particles * batch, self.latent_dim), inputs)
        return logits.reshape(*lead, batch, length, -1)

    def observation(self, z: torch.Tensor, x: Optional[torch.Tensor]) -> dist.TorchDistribution:
        """``p(x | z)``: the ids ``x`` ``[B, T]`` one word at a time (teacher
        forcing), masked where ``x`` is padding."""
        if x is None:
            raise ValueError("the sentence model scores given sentences; generate with pyro_vae.sentences")
        return dist.Categorical(logits=self.logits(z, x)).mask(x != self.pad_id).to_event(1)

    def next_word_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The last position's logits ``[N, V]`` with ``<pad>`` and ``<bos>`` ruled
        out: neither is ever a sentence's next word."""
        logits = logits[:, -1].clone()
        logits[:, [self.pad_id, BOS]] = float("-inf")
        return logits

    @torch.no_grad()
    def beam_search(self, z: torch.Tensor, max_length: int, eos_id: int, beam_size: int = 5) -> torch.Tensor:
        """The most probable sentence under ``p(x | z)`` each ``z`` ``[N, D]``
        keeps among ``beam_size`` hypotheses extended one word at a time
        (scores: summed word log-probabilities; a hypothesis that has emitted
        ``<eos>`` keeps its score and grows padding only): ``[N, <= max_length]``."""
        n, device = z.shape[0], z.device
        z = z.repeat_interleave(beam_size, 0)  # [N * beam, D]
        scores = torch.full((n, beam_size), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one live hypothesis to start from
        words = torch.full((n * beam_size, 1), BOS, dtype=torch.long, device=device)
        finished = torch.zeros(n * beam_size, dtype=torch.bool, device=device)
        state, history = None, torch.zeros(n * beam_size, 0, dtype=torch.long, device=device)
        for _ in range(max_length):
            logits, state = self.step_logits(z, words, state)
            log_probs = self.next_word_logits(logits).log_softmax(-1)
            pad_only = torch.full_like(log_probs, float("-inf"))
            pad_only[:, self.pad_id] = 0.0
            log_probs = torch.where(finished.unsqueeze(1), pad_only, log_probs)
            vocab = log_probs.shape[-1]
            candidates = (scores.reshape(-1, 1) + log_probs).reshape(n, beam_size * vocab)
            scores, best = candidates.topk(beam_size, -1)
            parent = (best // vocab + torch.arange(n, device=device).unsqueeze(1) * beam_size).reshape(-1)
            words = (best % vocab).reshape(-1, 1)
            history = torch.cat([history[parent], words], 1)
            finished = finished[parent] | (words[:, 0] == eos_id)
            state = tuple(s[:, parent] for s in state)
            if bool(finished.all()):
                break
        return history.reshape(n, beam_size, -1)[:, 0]

    @torch.no_grad()
    def generate(self, z: torch.Tensor, max_length: int, eos_id: int, mode: Literal["greedy", "sample"] = "greedy",
                 temperature: float = 1.0) -> torch.Tensor:
        """Sentences ``[N, <= max_length]`` decoded from ``z`` ``[N, D]``, one
        word at a time: the most probable (``greedy``) or a draw from
        ``softmax(logits / temperature)`` (``sample``); after ``<eos>`` only padding."""
        n = z.shape[0]
        words = torch.full((n, 1), BOS, dtype=torch.long, device=z.device)
        finished = torch.zeros(n, dtype=torch.bool, device=z.device)
        state, out = None, []
        for _ in range(max_length):
            logits, state = self.step_logits(z, words, state)
            logits = self.next_word_logits(logits)
            words = (logits.argmax(-1) if mode == "greedy"
                     else torch.distributions.Categorical(logits=logits / temperature).sample()).unsqueeze(1)
            out.append(torch.where(finished, torch.full_like(words[:, 0], self.pad_id), words[:, 0]))
            finished |= words[:, 0] == eos_id
            if bool(finished.all()):
                break
        return torch.stack(out, 1)
