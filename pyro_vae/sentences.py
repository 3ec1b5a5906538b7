"""Using a trained sentence VAE: encode, reconstruct, sample, interpolate.

A sentence is encoded as the mean of ``q(z | x)`` and decoded from a code by
the model's ``greedy`` (the most probable word at each step), ``sample``
(``softmax(logits / temperature)``) or ``beam`` (beam search over whole
sentences) decoder.  The interpolation between sentences ``a`` and ``b``
decodes ``z_t = (1 - t) mu(a) + t mu(b)`` for ``t`` evenly spaced in [0, 1]
(Bowman et al. 2016's homotopy).
"""
from __future__ import annotations

from typing import Literal

import torch

from pyro_vae.data.text import EOS

Decoding = Literal["greedy", "sample", "beam"]


class SentenceVAE:
    """A trained sentence model and guide with the dataset's vocabulary (``Experiment`` of text data)."""

    def __init__(self, experiment):
        if getattr(experiment.data, "modality", None) != "text" or not hasattr(experiment.model, "generate"):
            raise ValueError("this run does not model sentences: `pyro-vae sample` decodes text runs (image runs "
                             "draw samples.png at the end of training)")
        self.model, self.guide, self.data = experiment.model.eval(), experiment.guide.eval(), experiment.data
        self.vocabulary = experiment.data.vocabulary
        self.device = experiment.device

    def ids(self, sentences: list[str]) -> torch.Tensor:
        """Sentences (words split on white space; unknown words -> ``<unk>``) as a padded ``[N, T]`` batch."""
        encoded = [self.vocabulary.encode(s.split()) for s in sentences]
        batch = torch.zeros(len(encoded), max(len(e) for e in encoded), dtype=torch.long)
        for row, e in enumerate(encoded):
            batch[row, :len(e)] = torch.tensor(e)
        return batch.to(self.device)

    @torch.no_grad()
    def encode(self, sentences: list[str]) -> torch.Tensor:
        """The guide's mean code of each sentence: ``[N, D]``."""
        return self.guide.distribution(self.ids(sentences)).mean

    @torch.no_grad()
    def decode(self, z: torch.Tensor, mode: Decoding = "greedy", temperature: float = 1.0,
               beam_size: int = 5) -> list[str]:
        """A sentence from each code ``z`` ``[N, D]``."""
        max_length = self.data.max_length + 1
        if mode == "beam":
            ids = self.model.beam_search(z, max_length, EOS, beam_size)
        else:
            ids = self.model.generate(z, max_length, EOS, mode, temperature)
        return [self.vocabulary.decode(row) for row in ids.tolist()]

    def reconstruct(self, sentences: list[str], mode: Decoding = "greedy", **options) -> list[str]:
        return self.decode(self.encode(sentences), mode, **options)

    @torch.no_grad()
    def sample(self, n: int, mode: Decoding = "greedy", **options) -> list[str]:
        """``n`` sentences decoded from ``z ~ p(z)``."""
        return self.decode(self.model.prior(n).sample(), mode, **options)

    def interpolate(self, a: str, b: str, steps: int = 8, mode: Decoding = "greedy", **options) -> list[str]:
        """Sentences decoded along the segment from ``a``'s code to ``b``'s."""
        ends = self.encode([a, b])
        t = torch.linspace(0, 1, steps, device=ends.device).unsqueeze(1)
        return self.decode((1 - t) * ends[0] + t * ends[1], mode, **options)
