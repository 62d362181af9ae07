"""The one exception type that the CLI turns into a one-line error message."""


class RelayError(Exception):
    """An error the operator can act on; its message is printed as is, without a
    traceback, and the command exits non-zero."""
