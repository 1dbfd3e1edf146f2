"""Exceptions that end a run with a clear one-line message, and SIGTERM / SIGINT handling.

Signals: outside a training loop SIGTERM / SIGINT raise :class:`Terminated` at once. Inside one
(:func:`stop_at_step_boundary`) they are only recorded; after each optimizer step the trainer
all-reduces every rank's :func:`pending_signal` (one number), so all ranks write a checkpoint and raise
:class:`Terminated` together. A second SIGINT (Ctrl-C twice) stops at once.
"""

from __future__ import annotations

import contextlib
import signal

# Exit statuses of the entry points (recipes/cli.py); a self-restarting job (recipes/restart.py) retries
# none of these: they would fail the same way again.
USAGE_EXIT_STATUS = 2
DIVERGED_EXIT_STATUS = 3
# A checkpoint that does not fit on its file system: restarting would fill it again; free space first.
STORAGE_EXIT_STATUS = 4
# Any other exception (a failed collective, an I/O error): retried by a self-restarting job.
FAILURE_EXIT_STATUS = 1


class UsageError(ValueError):
    """Bad input: a wrong flag value, a missing file, an invalid DeepSpeed JSON.

    Raised before any training or writing wherever the problem can be seen up front. Entry points
    print it as a single ``error: ...`` line and exit with status 2, without a traceback.
    """


class StorageFull(OSError):
    """A checkpoint could not be written for lack of space: nothing of it is left in place, the previous
    checkpoints are intact. Entry points print one ``error: ...`` line and exit with status 4."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stops before the step is checkpointed."""


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived (preemption, Ctrl-C): unwind, mark the run KILLED, exit."""

    def __init__(self, signal_number: int):
        super().__init__(f"terminated by signal {signal_number}")
        self.signal_number = signal_number


_pending_signal: int | None = None
_is_deferring = False


def _handle(signal_number, _frame) -> None:
    global _pending_signal
    if not _is_deferring or (signal_number == signal.SIGINT and _pending_signal == signal.SIGINT):
        raise Terminated(signal_number)
    _pending_signal = signal_number


def raise_terminated_on_signals() -> None:
    """Install the SIGTERM / SIGINT handler (main thread only)."""
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, _handle)


def pending_signal() -> int | None:
    """The signal recorded inside :func:`stop_at_step_boundary`, if one arrived."""
    return _pending_signal


@contextlib.contextmanager
def stop_at_step_boundary():
    """Within the block, SIGTERM / SIGINT are recorded for the trainer instead of raised; one still
    recorded when the block ends is raised then."""
    global _is_deferring
    _is_deferring = True
    try:
        yield
    finally:
        _is_deferring = False
    if _pending_signal is not None:
        raise Terminated(_pending_signal)
