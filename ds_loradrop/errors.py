"""The one exception type that means "the user asked for something that cannot work"."""


class UsageError(ValueError):
    """Bad input: a wrong flag value, a missing file, an invalid DeepSpeed JSON.

    Raised before any training or writing wherever the problem can be seen up front. Entry points
    print it as a single ``error: ...`` line and exit with status 2, without a traceback.
    """
