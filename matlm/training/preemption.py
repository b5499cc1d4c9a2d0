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

A signal can land while the main thread runs a garbage-collector callback or a `__del__`
(JAX registers one, `_xla_gc_callback`): Python cannot propagate an exception from there
and prints it as "Exception ignored in …" with a traceback. The signal is recorded before
the raise, so nothing is lost: `install()` also filters `Preempted` out of
`sys.unraisablehook`, and the next `check()` (at the latest when the loop opens) raises it.
"""
from __future__ import annotations

import signal
import sys
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
        self._previous_unraisable_hook = None

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
        self._previous_unraisable_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._previous_unraisable_hook is not None:
            sys.unraisablehook = self._previous_unraisable_hook
            self._previous_unraisable_hook = None
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

    def _unraisable(self, unraisable) -> None:
        # A Preempted raised inside a gc callback or __del__ was swallowed; it is recorded
        # in `received`, so only other unraisable exceptions are reported.
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, Preempted):
            return
        (self._previous_unraisable_hook or sys.__unraisablehook__)(unraisable)


SIGNALS = Signals()
