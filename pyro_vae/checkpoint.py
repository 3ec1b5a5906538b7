"""Checkpoints: plain ``state_dict``s written atomically, read back with
``torch.load(..., weights_only=True)`` so a checkpoint file cannot run code.

Each save keeps the one before it: ``checkpoint.pt`` is the newest and
``checkpoint.prev.pt`` the previous, so a newest checkpoint damaged after it
was written (a full disk, a truncated copy) still leaves a good one to resume
from.  The random-number state of every generator the run draws from (torch
on the CPU and CUDA, Python's :mod:`random`, NumPy) travels in the checkpoint
as tensors and lists, which the safe loader admits, so a resumed run follows
the same path bit for bit.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pyro_vae.errors import CheckpointError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
REQUIRED = frozenset({"model", "guide", "optimizer", "epoch"})


def previous_of(path: str | Path) -> Path:
    return Path(path).with_name(PREVIOUS)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file, move the current checkpoint to
    ``checkpoint.prev.pt``, then rename the new one into place: a crash at any
    moment leaves at least one complete checkpoint."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        if path.is_file():
            os.replace(path, previous_of(path))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def discard_newest(path: str | Path) -> None:
    """Set the newest checkpoint aside as ``checkpoint.pt.diverged`` and make
    the previous one (if any) the newest again."""
    path, previous = Path(path), previous_of(path)
    if path.is_file():
        os.replace(path, path.with_name(path.name + ".diverged"))
    if previous.is_file():
        os.replace(previous, path)


def _read(path: Path, map_location) -> dict[str, Any]:
    """``torch.load`` with tensors and plain containers only, or a one-line CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        if "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, refused because loading it "
                "could run code (only checkpoints written by pyro-vae load)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is corrupt or not a pyro-vae checkpoint ({first})") from None
    missing = REQUIRED - set(state) if isinstance(state, dict) else {"everything"}
    if missing:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint: it lacks {sorted(missing)}")
    return state


def peek(path: str | Path) -> Optional[str]:
    """Where the checkpoint at ``path`` stands, in words (``None`` if it does
    not load), without moving any file."""
    try:
        return describe(_read(Path(path), "cpu"))
    except CheckpointError:
        return None


def describe(state: dict[str, Any]) -> str:
    """Where a checkpoint stands: ``epoch 4, step 120`` (inside epoch 4,
    after its 120th step) or ``the end of epoch 3``."""
    epoch, step = state["epoch"], state.get("step_in_epoch", 0)
    return f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    from_previous: bool = False) -> dict[str, Any]:
    """The newest checkpoint at ``path``.  A missing newest checkpoint beside
    a previous one (a crash between the two renames of :func:`save_checkpoint`)
    falls back to the previous.  A corrupt one is an error naming the previous
    checkpoint, if it is intact; ``from_previous`` then moves the corrupt file
    to ``checkpoint.pt.corrupt`` and makes the previous one the newest."""
    path, previous = Path(path), previous_of(path)
    if not path.is_file():
        if previous.is_file():
            os.replace(previous, path)
        else:
            raise CheckpointError(
                f"no checkpoint at {path}; train first with `pyro-vae train CONFIG --run-dir {path.parent}`")
    try:
        return _read(path, map_location)
    except CheckpointError as newest_error:
        if not previous.is_file():
            raise CheckpointError(f"{newest_error}. There is no previous checkpoint: train again with "
                                  "--overwrite, or point at another run directory.") from None
        try:
            previous_state = _read(previous, map_location)
        except CheckpointError:
            raise CheckpointError(f"{newest_error}, and the previous checkpoint {previous} is corrupt too. "
                                  "Train again with --overwrite.") from None
        if not from_previous:
            raise CheckpointError(
                f"{newest_error}. The previous checkpoint {previous} ({describe(previous_state)}) is intact: "
                "rerun with --from-previous-checkpoint to continue from it.") from None
        os.replace(path, path.with_name(path.name + ".corrupt"))
        os.replace(previous, path)
        return previous_state


def rng_state() -> dict[str, Any]:
    """The state of torch's CPU (and CUDA) generators, :mod:`random` and NumPy's
    global generator, as tensors and lists (loadable with ``weights_only``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "random": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())  # (a checkpoint loaded onto CUDA moved these there)
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def restore_weights(model: torch.nn.Module, guide: torch.nn.Module, state: dict[str, Any],
                    event_shape: tuple[int, ...], path: str | Path) -> None:
    """Load the checkpoint's model and guide weights, or say in one line why
    they do not fit (data of another shape, a changed part)."""
    saved_shape = tuple(state.get("event_shape", event_shape))
    if saved_shape != tuple(event_shape):
        raise CheckpointError(
            f"{path} was trained on data of shape {saved_shape}, but the data now give {tuple(event_shape)}: "
            "point data.path back at the data it was trained on, or train a new run.")
    for name, module in (("model", model), ("guide", guide)):
        try:
            module.load_state_dict(state[name])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit the {name} that config.toml builds ({first.rstrip(':')}); "
                                  "was the part's code or an imported module changed?") from None
