"""Errors that name the problem and the fix.  Each is raised instead of a bare
traceback wherever user input (a config, a checkpoint, data) is at fault."""


class PyroVAEError(Exception):
    """Base class: the CLI prints these as one message, without a traceback."""


class ConfigError(PyroVAEError, ValueError):
    """A config file, override or registered name is wrong."""


class DataError(PyroVAEError, ValueError):
    """Data cannot be read, or does not fit the model's likelihood."""


class CheckpointError(PyroVAEError):
    """A checkpoint is missing, corrupt, or belongs to another experiment."""


class TrainingDivergedError(PyroVAEError, FloatingPointError):
    """The loss became NaN or infinite."""
