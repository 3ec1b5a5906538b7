"""Image splits held as one tensor on the device; a batch is an index slice.

Pixels are stored as ``uint8`` intensities ``v`` in 0..255 (gray level
``v / 255``).  Binarization turns gray levels into the 0/1 data a Bernoulli
likelihood needs:

- ``dynamic``: each training batch draws ``x ~ Bernoulli(v / 255)`` afresh, on
  the device (a new binarization every epoch, as in Burda et al. 2015); the
  valid and test splits are drawn once with a fixed seed, so evaluation is
  deterministic.
- ``static``: every split drawn once with a fixed seed.
- ``threshold``: ``x = [v / 255 > 0.5]``.
- ``none``: gray levels ``v / 255`` in [0, 1] (for likelihoods on [0, 1]).
- ``dequantize``: ``x = (v + u) / 256``, ``u ~ U(0, 1)`` per pixel, drawn
  afresh for each training batch and once (fixed seed) for valid and test:
  a continuous density ``p`` on [0, 1]^D then bounds the probability of the
  256-level image, ``log P(v) >= E_u[log p((v + u) / 256)] - D log 256``
  (Theis et al. 2016), which is what :meth:`ImageDataset.bits_per_dim` reports.

Bits per dimension: ``NLL / (D ln 2)`` for binary data (a probability mass),
``(NLL + D ln 256) / (D ln 2)`` for dequantised data; undefined for ``none``
(a density at 256 grid points is not a probability).
"""
from __future__ import annotations

from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch

import math

Binarization = Literal["dynamic", "static", "threshold", "none", "dequantize"]
LEVELS = 256


LANE_TOP = 2**15 - 1  # the 16-bit value 2^16 - 1 read as int16: the one value the binarizer redraws


def random_lanes(n: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` independent integers uniform on the 2^16 values of ``int16``,
    four from each random 64-bit word (torch's full-range ``random_``)."""
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
    return words.view(torch.int16)[:n]


def lane_thresholds(gray: torch.Tensor) -> torch.Tensor:
    """``257 v - 2^15`` per ``uint8`` gray level ``v``, as ``int16``: the
    threshold :func:`bernoulli_gray_levels` compares a shifted 16-bit lane
    with.  Computed in int16 arithmetic: its products and sums wrap modulo
    2^16 and so give it exactly (three passes; four in int32, 3x slower)."""
    return gray.to(torch.int16).mul_(257).add_(-2**15)


def redraw_top_lanes(lanes: torch.Tensor, rows: int, generator: Optional[torch.Generator] = None) -> None:
    """Replace, in place, every lane equal to :data:`LANE_TOP` by a fresh
    random lane, until none is left.  The lanes found in one pass get
    consecutive fresh lanes in ascending position order (the order of a
    boolean-mask assignment).  ``lanes`` is searched as ``rows`` rows: the
    rows' maxima first, then only the rows that hold the value (~22 us for
    a batch of 100 MNIST images, against ~55 for a mask over every lane:
    torch's CPU comparisons into ``bool`` and its index reductions are not
    vectorised, its ``max`` is).  On a GPU, one host sync a batch without
    such a lane, three a pass with one."""
    if not lanes.numel():
        return
    table = lanes.view(rows, -1)
    while lanes.max() == LANE_TOP:
        hit_rows = (table.amax(1) == LANE_TOP).nonzero().squeeze(1)
        row_in_hits, column = (table.index_select(0, hit_rows) == LANE_TOP).nonzero().unbind(1)
        table.index_put_((hit_rows.index_select(0, row_in_hits), column),
                         random_lanes(len(column), lanes.device, generator))


def bernoulli_gray_levels(thresholds: torch.Tensor, dtype: torch.dtype,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x ~ Bernoulli(v / 255)`` per gray level ``v``, exactly, as 1.0 or
    0.0 in ``dtype``, given ``thresholds`` = :func:`lane_thresholds` of the
    levels: ``x = [r < 257 v]`` with ``r`` uniform on {0, ..., 65534}, so
    ``P(x = 1) = 257 v / 65535 = v / 255``.  ``r`` is a random 16-bit lane
    (:func:`random_lanes`, shifted by 2^15 to compare as ``int16``), the
    lanes 65535 redrawn (:func:`redraw_top_lanes`; each with probability
    2^-16: 1.2 of a batch of 100 MNIST images on average).

    Four pixels a 64-bit draw, the comparison written straight into the
    output dtype (one pass; into ``bool`` then converted, ~2.5x as long):
    on the CPU ~115 us for a batch of 100 MNIST images (55 of them the
    draws; ~240 between compiled training steps, which leave the caches
    cold), against ~200 for the draws alone of a float uniform per pixel
    to compare with v / 255 (which is exact only to the uniform's 2^-24),
    and ~1 ms for torch's ``bernoulli`` with a per-pixel ``p`` (a scalar loop)."""
    lanes = random_lanes(thresholds.numel(), thresholds.device, generator)
    redraw_top_lanes(lanes, len(thresholds) if thresholds.dim() else 1, generator)
    ones = torch.empty(thresholds.shape, dtype=dtype, device=thresholds.device)
    return torch.lt(lanes.view(thresholds.shape), thresholds, out=ones)


def take(rows: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    """``rows[index]`` along the first dim: a view for a slice, else
    ``index_select`` (5 us for 100 MNIST images where advanced indexing
    takes 25-80)."""
    return rows[index] if isinstance(index, slice) else rows.index_select(0, index)


class ImageSplit:
    """One split: ``pixels`` of shape ``[N, *event_shape]`` on one device.

    :param pixels: uint8 tensor; gray levels 0..255, or 0/1 once binarized.
    :param resample: draw ``Bernoulli(pixels / 255)`` per batch (dynamic
        binarization), from the pixels' :func:`lane_thresholds`, computed
        once (int16: twice the pixels' memory; ~15 us a batch saved).
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, resample: bool, gray: bool,
                 dequantize: bool = False, noise: Optional[torch.Tensor] = None,
                 thresholds: Optional[torch.Tensor] = None):
        """:param dequantize: ``(v + u) / 256``, ``u`` from ``noise`` (fixed) or
        drawn per batch when ``noise`` is ``None``.
        :param thresholds: the pixels' thresholds when already computed (a view's)."""
        self.pixels = pixels
        self.labels = labels
        self.resample = resample
        self.gray = gray
        self.dequantize = dequantize
        self.noise = noise
        self.thresholds = lane_thresholds(pixels) if resample and thresholds is None else thresholds

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def batch(self, index: torch.Tensor | slice, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Float images for ``index`` (an index tensor or slice)."""
        if self.resample:
            return bernoulli_gray_levels(take(self.thresholds, index), torch.get_default_dtype(), generator)
        x = take(self.pixels, index).to(torch.get_default_dtype())
        if self.dequantize:
            u = take(self.noise, index).to(x.dtype) if self.noise is not None else \
                torch.rand(x.shape, device=x.device, generator=generator)
            return x.add_(u).div_(LEVELS)
        return x.div_(255.0) if self.gray else x

    def permutation(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A random order of the split's indices, drawn from ``generator``."""
        return torch.randperm(len(self), device=self.device, generator=generator)

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None
    ) -> Iterator[torch.Tensor]:
        """Yield float batches covering the split once (the last may be smaller)."""
        order = self.permutation(generator) if shuffle else None
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size] if shuffle else slice(start, start + batch_size)
            yield self.batch(index, generator)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def part(self, index: int, parts: int) -> "ImageSplit":
        """The ``index``-th of ``parts`` contiguous, nearly equal parts (a view)."""
        bounds = [len(self) * k // parts for k in range(parts + 1)]
        return self.rows(slice(bounds[index], bounds[index + 1]))

    def head(self, n: int) -> "ImageSplit":
        """The first ``n`` datapoints (a view, no copy)."""
        return self.rows(slice(0, n))

    def rows(self, view: slice) -> "ImageSplit":
        """The datapoints ``view`` as a split of their own (a view, no copy)."""
        def cut(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return t[view] if t is not None else None
        return ImageSplit(self.pixels[view], self.labels[view], self.resample, self.gray, self.dequantize,
                          cut(self.noise), cut(self.thresholds))


class ImageDataset:
    """Train / valid / test splits of images with one binarization rule.

    :param splits: ``{"train": (pixels, labels), ...}`` of uint8 numpy arrays or tensors.
    """

    def __init__(
        self,
        splits: dict[str, tuple],
        binarization: Binarization,
        device: torch.device,
        seed: int = 0,
    ):
        if binarization not in ("dynamic", "static", "threshold", "none", "dequantize"):
            raise ValueError(f"unknown binarization {binarization!r}")
        self.binarization = binarization
        self.binary = binarization not in ("none", "dequantize")
        fixed = torch.Generator().manual_seed(seed)
        self.splits: dict[str, ImageSplit] = {}
        for name, (pixels, labels) in splits.items():
            pixels = torch.as_tensor(pixels, dtype=torch.uint8)
            if pixels.dim() == 3:
                pixels = pixels.unsqueeze(1)  # [N, 1, H, W]
            labels = torch.as_tensor(labels, dtype=torch.long)
            resample = binarization == "dynamic" and name == "train"
            if binarization == "threshold":
                pixels = (pixels > 127).to(torch.uint8)
            elif binarization == "static" or (binarization == "dynamic" and not resample):
                pixels = torch.bernoulli(pixels.double() / 255.0, generator=fixed).to(torch.uint8)
            gray = binarization == "none"
            dequantize = binarization == "dequantize"
            noise = torch.rand(pixels.shape, generator=fixed).to(device) if dequantize and name != "train" else None
            self.splits[name] = ImageSplit(pixels.to(device), labels.to(device), resample, gray, dequantize, noise)
        self.event_shape = tuple(next(iter(self.splits.values())).pixels.shape[1:])

    @property
    def spec(self) -> dict[str, Any]:
        """The data spec the parts are built from (:data:`pyro_vae.registry.DATA_SPEC`)."""
        return {"event_shape": self.event_shape}

    modality = "images"
    outputs_per_value = 1  # one logit (or mean) per pixel: sizes the evaluator's chunks

    def unit_metrics(self, log_likelihood: np.ndarray, split: ImageSplit) -> dict[str, Optional[float]]:
        """The per-datapoint log-likelihoods of ``split`` as bits per dimension."""
        return {"bits_per_dim": self.bits_per_dim(float(-log_likelihood.mean()))}

    def save_pictures(self, run, model, guide, split: str) -> None:
        """The end-of-training pictures: prior samples and reconstructions of the split's first 32 images."""
        from pyro_vae.plots import save_reconstructions, save_samples

        with run.atomic("samples.png") as path:
            save_samples(model, self.event_shape, path)
        with run.atomic("reconstructions.png") as path:
            save_reconstructions(model, guide, self[split].batch(slice(0, 32)), path)

    def __getitem__(self, split: str) -> ImageSplit:
        return self.splits[split]

    def bits_per_dim(self, nll: float) -> Optional[float]:
        """A negative log-likelihood in nats per image as bits per dimension
        (see the module docstring); ``None`` for gray levels that were not
        dequantised."""
        dims = math.prod(self.event_shape)
        if self.binarization == "none":
            return None
        if self.binarization == "dequantize":
            nll = nll + dims * math.log(LEVELS)
        return nll / (dims * math.log(2))
