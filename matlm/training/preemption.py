"""SIGTERM/SIGINT (preemption, Ctrl-C) from the first line of `matlm train` to its last.

The handler only ever *records* the signal; the job acts on it at points where stopping is
safe. It never raises from inside whatever the main thread happens to run, because most
of start-up is native code with worker threads of its own:

- an exception raised while JAX waits for a compile (jaxlib checks for signals while it
  waits) abandons the compile on XLA's thread pool; the interpreter then exits under that
  thread, which crashes in `PjRtLoadedExecutable::Create` (exit 139, after the clean
  "nothing new to save" line: issue 28, proven by the crash's native stack and the
  signal's Python stack in `backend_compile_and_load`);
- raised during a native extension's initialisation (jaxlib at ~0.15 s) it turns into an
  `ImportError` traceback, during TensorFlow's an abort (134);
- raised inside a Python callback of native code (SentencePiece's sentence iterator) it
  fails the vocabulary training; inside a `__del__` or gc callback it cannot propagate.

A job is in one of two modes:

- **start-up** (imports, validation, lock, vocabulary, restore or initialisation, before
  the first step): there is nothing new to save. `check()` at the end of each start-up
  phase raises `Preempted`; `matlm train` catches it, prints one line and exits 0. The
  longest wait is one phase (seconds: the imports, a compile, a vocabulary training).
  `Preempted` is a BaseException (like KeyboardInterrupt) so that no `except Exception`
  on the way mistakes it for a failure and acts on it.
- **deferred** (from the first step on: the loop, evals, the final save): the loop's
  preemption hook saves the current step and stops; an eval in progress gives up between
  batches (`check()`); a save in progress finishes.

`SIGNALS` is the process's one instance. `install()` is idempotent, so the `matlm`
program installs it before its heavy imports and `train()` (also called from Python)
installs it if nobody has. Handlers can only be installed from the main thread; elsewhere
(a notebook's worker thread) nothing is installed and signals keep their default action.

Before the handlers are in, the `matlm` program holds the signals blocked (`hold()`): a
blocked signal stays pending, across the huge-page re-exec too (execve keeps the signal
mask; matlm.runtime), and `install()` unblocks it into the handler. Only the first
interpreter's own start-up (~20 ms, before `matlm`'s first line runs) is uncovered.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

HANDLED = (signal.SIGTERM, signal.SIGINT)
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")  # POSIX; not on Windows.


class Preempted(BaseException):
    """A signal asked the job to stop where it cannot save anything new."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def hold() -> None:
    """Blocks SIGTERM/SIGINT in the calling thread: they stay pending until `install()`
    (or `release()`). Threads started meanwhile inherit the block, so a pending signal
    waits for the main thread."""
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def release() -> None:
    """Unblocks SIGTERM/SIGINT in the calling thread: a pending one is delivered now."""
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


def ignore_from_now() -> None:
    """Ignores SIGTERM/SIGINT for the rest of the process: the `matlm` program calls it
    once its exit status is decided, so a signal during interpreter shutdown cannot turn
    that status into 143 or a KeyboardInterrupt (Python resets its own handlers to the
    default action while it finalizes; an ignored signal stays ignored)."""
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_IGN)


class Signals:
    def __init__(self):
        self.received: Optional[str] = None  # The first signal's name, once one arrived.
        self.deferred = False
        self._previous: dict = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Installs the recording handlers in start-up mode and unblocks the signals (one
        that arrived while `hold()` blocked them is recorded now); returns whether this
        call installed them (False when they already were, or off the main thread)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return False
        self.received, self.deferred = None, False
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        release()
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self.received, self.deferred = None, False

    def defer(self) -> None:
        """The loop has started: a signal now saves the current step and stops it (the
        preemption hook) instead of ending the start-up."""
        self.deferred = True

    def check(self) -> None:
        """Raises Preempted if a signal arrived: start-up calls it between its phases,
        long work (evals) between its pieces."""
        if self.received is not None:
            raise Preempted(self.received)

    def _handle(self, signum, frame) -> None:
        # Only records: see the module docstring for why it never raises.
        self.received = self.received or signal.Signals(signum).name


SIGNALS = Signals()
