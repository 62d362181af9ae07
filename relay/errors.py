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

# What each status means, in a word and in full, for relay --help, relay(8) and
# the README (relay/docgen.py).
EXIT_MEANINGS = {
    EXIT_OK: ("found", "done; for a query (logs, ban show, sessions, status), something was "
                       "found (status: the relay runs)"),
    EXIT_NOTHING: ("nothing found", "a query found nothing, having read everything it needed "
                                    "(status: no relay runs; doctor: a required check failed; "
                                    "ban remove: no such ban)"),
    EXIT_USAGE: ("usage or error", "not done: a bad option or value, a data directory without "
                                   "relay data, no relay running where one is needed, no "
                                   "permission; one line on stderr says which"),
    EXIT_INCOMPLETE: ("results incomplete", "results printed, but files they needed are "
                                            "damaged or missing, or the packet log was deleted "
                                            "or is missing for the sessions asked about "
                                            "(verify, verify-bundle: a problem found); the "
                                            "warnings say which"),
    EXIT_BUG: ("internal error", "a bug in relay: one line; RELAY_DEBUG=1 shows the traceback"),
}
