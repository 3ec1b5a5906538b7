"""A dSprites-style dataset with known generative factors, rendered here
(dSprites itself cannot be downloaded).

Every combination of five factors is drawn once, as a binary 64 x 64 image:

====================  ==========================================================
factor                values
====================  ==========================================================
shape                 square, ellipse, heart
scale                 6 values in [0.5, 1]
orientation           ``orientations`` angles in [0, 2 pi) (dSprites: 40)
position x, y         ``positions`` values each in [0, 1] (dSprites: 32)
====================  ==========================================================

A shape of scale ``s`` has half-size ``11 s`` pixels and its centre moves
over ``[14, 50]`` in each axis, so every sprite stays on the canvas.  The
default is a documented subset of dSprites' grid, 10 orientations and 16 x 16
positions (46,080 images, 189 MB as bytes); ``orientations = 40, positions =
32`` is dSprites' full grid (737,280 images).  The images are shuffled with a
fixed seed into train / valid / test (80 / 10 / 10 %); each split's labels
are the ``[N, 5]`` factor indices.  Rendering is deterministic and cached in
``$PYRO_VAE_CACHE`` (bit-packed).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from pyro_vae.data.images import Binarization, ImageDataset
from pyro_vae.data.mnist import cache_dir
from pyro_vae.registry import DATASETS

SHAPES = ("square", "ellipse", "heart")
SCALES = np.linspace(0.5, 1.0, 6)
FACTORS = ("shape", "scale", "orientation", "position_x", "position_y")
CANVAS = 64
HALF_SIZE = 11.0
MARGIN = 14.0
CACHE_VERSION = 1


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the point ``(u, v)`` of the sprite's own frame (unit half-size,
    v up) lies inside ``shape``."""
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "ellipse":
        return u**2 + (v / 0.5) ** 2 <= 1.0
    u, v = 1.15 * u, 1.15 * v + 0.15  # the heart curve (u^2 + v^2 - 1)^3 <= u^2 v^3, centred
    return (u**2 + v**2 - 1.0) ** 3 <= u**2 * v**3


def render(orientations: int = 10, positions: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Every factor combination: images ``[N, 64, 64]`` (uint8, 0 or 255) and
    factor indices ``[N, 5]`` in the order of :data:`FACTORS`."""
    angles = np.linspace(0.0, 2 * np.pi, orientations, endpoint=False)
    centres = MARGIN + np.linspace(0.0, 1.0, positions) * (CANVAS - 2 * MARGIN)
    pixel = np.arange(CANVAS) + 0.5
    # offsets of every pixel from every centre: [P, 1, 1, 64] (x) and [1, P, 64, 1] (y)
    dx = (pixel[None, None, None, :] - centres[:, None, None, None])
    dy = (centres[None, :, None, None] - pixel[None, None, :, None])  # image rows grow downwards
    images, labels = [], []
    for s, shape in enumerate(SHAPES):
        for c, scale in enumerate(SCALES):
            for o, angle in enumerate(angles):
                cos, sin = np.cos(angle), np.sin(angle)
                u = (cos * dx + sin * dy) / (HALF_SIZE * scale)  # rotate by -angle into the sprite's frame
                v = (-sin * dx + cos * dy) / (HALF_SIZE * scale)
                masks = _inside(shape, u, v)  # [P, P, 64, 64]: x position, y position
                images.append(masks.reshape(-1, CANVAS, CANVAS))
                grid = np.stack(np.meshgrid(np.arange(positions), np.arange(positions), indexing="ij"), -1)
                labels.append(np.concatenate([np.tile([[s, c, o]], (positions**2, 1)), grid.reshape(-1, 2)], 1))
    return (np.concatenate(images) * 255).astype(np.uint8), np.concatenate(labels).astype(np.int64)


def load_shapes(orientations: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render`'s output through a bit-packed cache."""
    path = cache_dir() / f"shapes-v{CACHE_VERSION}-o{orientations}-p{positions}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                bits, labels = z["bits"], z["labels"]
            return np.unpackbits(bits, axis=-1).reshape(-1, CANVAS, CANVAS) * np.uint8(255), labels
        except (OSError, ValueError, KeyError):
            pass  # a broken cache is rendered again
    images, labels = render(orientations, positions)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, bits=np.packbits(images.reshape(len(images), -1) > 0, axis=-1), labels=labels)
    os.replace(tmp, path)
    return images, labels


@DATASETS.register("shapes")
def shapes(
    device: torch.device,
    orientations: int = 10,
    positions: int = 16,
    binarization: Binarization = "threshold",
    split_seed: int = 0,
) -> ImageDataset:
    """dSprites-style shapes with known factors (shape, scale, orientation, x, y), rendered procedurally."""
    images, labels = load_shapes(orientations, positions)
    order = np.random.default_rng(split_seed).permutation(len(images))
    cut_train, cut_valid = int(0.8 * len(images)), int(0.9 * len(images))
    parts = {"train": order[:cut_train], "valid": order[cut_train:cut_valid], "test": order[cut_valid:]}
    return ImageDataset({name: (images[idx], labels[idx]) for name, idx in parts.items()}, binarization, device)
