"""One exception type for every user-facing error.

The CLI catches :class:`BnbenchError` and prints ``bnbench: error: <message>`` on one line with a
non-zero exit status; anything else is a bug and keeps its traceback.
"""


class BnbenchError(Exception):
    """A bad input (config, option, data, environment) that the user can fix."""
