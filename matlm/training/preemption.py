"""SIGTERM/SIGINT (preemption, Ctrl-C) from the first line of `matlm train` to its last.

A training job is in one of two modes:

- **start-up** (imports, validation, restore, before the first step): there is nothing new
  to save, so the handler raises `Preempted` at once; `matlm train` catches it, prints one
  line and exits 0. `Preempted` is a BaseException (like KeyboardInterrupt) so that no
  `except Exception` on the way — e.g. the fallback over unreadable checkpoints — mistakes
  it for a failure and acts on it.
- **deferred** (from the first step on: the loop, evals, the final save): the handler only
  records the signal. The loop's preemption hook then saves the current step and stops;
  an eval in progress gives up between batches (`check()`); a save in progress finishes.

`SIGNALS` is the process's one instance: `install()` is idempotent, so `matlm train`
installs it before its heavy imports and `train()` (also called from Python) installs it
if nobody has. Handlers can only be installed from the main thread; elsewhere (a
notebook's worker thread) nothing is installed and signals keep their default action.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Preempted(BaseException):
    """A signal asked the job to stop where it cannot save anything new."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Signals:
    def __init__(self):
        self.received: Optional[str] = None  # The first signal's name, once one arrived.
        self.deferred = False
        self._previous: dict = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Installs the handlers in start-up mode; returns whether this call installed
        them (False when they already were, or off the main thread)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return False
        self.received, self.deferred = None, False
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self.received, self.deferred = None, False

    def defer(self) -> None:
        """From now on a signal is only recorded (the loop saves and stops)."""
        self.deferred = True

    def check(self) -> None:
        """Raises Preempted if a signal arrived (long work calls it between pieces)."""
        if self.received is not None:
            raise Preempted(self.received)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        if not self.deferred:
            raise Preempted(self.received)


SIGNALS = Signals()
