"""User-facing errors.

Anything raised as a `PrimeError` is a problem with the user's input or
environment, not a bug: the CLI prints its message on one line and exits
non-zero instead of showing a traceback.
"""


class PrimeError(Exception):
    """Base class for errors the CLI reports as one line."""
