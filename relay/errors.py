"""The one exception type that the CLI turns into a one-line error message, and
the exit statuses every ``relay`` command uses (README "Exit status", relay(8))."""


class RelayError(Exception):
    """An error the operator can act on; its message is printed as is, without a
    traceback, and the command exits with EXIT_USAGE."""


# grep's convention (0 found, 1 not found, 2 trouble), with one more: an answer
# read past damaged or missing files is not the same as a whole one.
EXIT_OK = 0  # done; a query found something
EXIT_NOTHING = 1  # a query found nothing (and read everything it needed)
EXIT_USAGE = 2  # not done: a bad option or value, no relay data, no relay running, ...
EXIT_INCOMPLETE = 3  # results printed, but corrupt or missing files, or no packet log
EXIT_BUG = 4  # an internal error: a bug in relay, to be reported
