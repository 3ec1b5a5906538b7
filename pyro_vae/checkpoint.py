"""Checkpoints: plain ``state_dict``s written atomically, read back with
``torch.load(..., weights_only=True)`` so a checkpoint file cannot run code."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from pyro_vae.errors import CheckpointError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file, then rename: a crash mid-write leaves the
    previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first with `pyro-vae train CONFIG --run-dir {path.parent}`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is corrupt or not a pyro-vae checkpoint ({first}). Delete it to train from "
            "scratch, or point at another run directory."
        ) from None
    missing = {"model", "guide", "optimizer", "epoch"} - set(state) if isinstance(state, dict) else {"everything"}
    if missing:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint: it lacks {sorted(missing)}")
    return state
