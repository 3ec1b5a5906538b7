"""Errors that name the problem and the fix.  Each is raised instead of a bare
traceback wherever user input (a config, a checkpoint, data) is at fault, or
where training had to stop.  The CLI prints the message on one line and exits
with the error's :attr:`~PyroVAEError.exit_code`."""
import difflib
from typing import Iterable


def did_you_mean(word: str, valid: Iterable[str]) -> str:
    """`` Did you mean 'lr'?`` when ``word`` is close to one of ``valid``, else ``""``."""
    close = difflib.get_close_matches(word, list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class PyroVAEError(Exception):
    """Base class: the CLI prints these as one message, without a traceback."""

    exit_code = 2


class ConfigError(PyroVAEError, ValueError):
    """A config file, override, command-line value or registered name is wrong."""


class DataError(PyroVAEError, ValueError):
    """Data cannot be read, or does not fit the model's likelihood."""


class CheckpointError(PyroVAEError):
    """A run directory or checkpoint is missing, corrupt, or belongs to another experiment."""


class TrainingDivergedError(PyroVAEError, FloatingPointError):
    """The loss or a gradient became NaN or infinite, or the loss exploded."""

    exit_code = 3


class TrainingInterrupted(PyroVAEError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written;
    exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), as a shell does."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
