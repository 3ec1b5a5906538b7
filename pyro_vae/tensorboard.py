"""Training metrics as TensorBoard event files in ``RUN_DIR/tensorboard``
(the optional ``tensorboard`` extra), so ``tensorboard --logdir runs``
compares runs.  Scalars are logged against the optimizer step; a resumed run
purges events after its checkpoint's step, so a killed run leaves no
duplicate curve."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pyro_vae.errors import ConfigError

INSTALL = "pip install 'pyro-vae[tensorboard]' (or `pip install tensorboard`)"


def tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the `tensorboard` package)
    except ImportError:
        return False
    return True


def check_tensorboard(enabled: Optional[bool]) -> bool:
    """Whether to write event files: ``train.tensorboard`` if set, else
    whether TensorBoard is installed.  ``true`` without it is a ConfigError."""
    if enabled and not tensorboard_available():
        raise ConfigError(f"train.tensorboard = true but TensorBoard is not installed: {INSTALL}, "
                          "or set train.tensorboard = false")
    return tensorboard_available() if enabled is None else enabled


class TensorBoardLog:
    """A :class:`torch.utils.tensorboard.SummaryWriter` for one training call."""

    def __init__(self, run_path: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_path / "tensorboard"
        if log_dir.is_symlink():
            raise ConfigError(f"{log_dir} is a symbolic link; pyro-vae writes only inside the run directory. "
                              "Remove the link.")
        # events at steps above the checkpoint's belong to the interrupted run, and are dropped
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=step + 1 if step else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
