"""The one exception type that means "the user asked for something that cannot work"."""


class UsageError(ValueError):
    """Bad input: a wrong flag value, a missing file, an invalid DeepSpeed JSON.

    Raised before any training or writing wherever the problem can be seen up front. Entry points
    print it as a single ``error: ...`` line and exit with status 2, without a traceback.
    """


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived (preemption, Ctrl-C): unwind, mark the run KILLED, exit."""

    def __init__(self, signal_number: int):
        super().__init__(f"terminated by signal {signal_number}")
        self.signal_number = signal_number


def raise_terminated_on_signals() -> None:
    """Turn SIGTERM and SIGINT into :class:`Terminated` in the main thread."""
    import signal

    def handler(signal_number, _frame):
        raise Terminated(signal_number)

    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, handler)
