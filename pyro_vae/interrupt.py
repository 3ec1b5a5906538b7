"""Stopping training cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's kill).

Inside :class:`StopRequests` the first such signal only records itself; the
trainer sees it after the current step, writes a checkpoint and raises
:class:`~pyro_vae.errors.TrainingInterrupted`.  A second signal stops at once
(:class:`~pyro_vae.errors.TrainingInterrupted` raised from the handler), for
a user who cannot wait for the step to finish.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

from pyro_vae.errors import TrainingInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager recording SIGINT/SIGTERM in :attr:`received` (the
    signal number, else ``None``).  Outside the main thread, where Python
    cannot install handlers, it records nothing."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise TrainingInterrupted(f"stopped at once by a second {signal.Signals(signum).name}, without a "
                                      "checkpoint; the run resumes from its last checkpoint", signum)
        self.received = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
