"""What a PriME-FL process logs: our own progress at INFO, other libraries only when they warn.

One place for it, used by the `prime-fl` command line and by the ServerApp.
Third-party libraries (alembic, httpx, flwr, Ray, transformers) log at INFO
and DEBUG and raise FutureWarning / DeprecationWarning about their own
internals: noise for a user of this tool, so it is hidden unless they ask
(`-v`, or Python's own `-W` / `PYTHONWARNINGS`, which always win).
"""

from __future__ import annotations

import logging
import sys
import warnings

OWN_LOGGERS = ("common", "client", "server", "simulations")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_WARNINGS = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)


def setup_command_line(verbose: bool) -> None:
    """For a `prime-fl` command: our loggers at INFO (DEBUG with -v), every other logger at WARNING (DEBUG with -v)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=FORMAT)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        silence_library_warnings()


def setup_app() -> None:
    """For a Flower app process: show our INFO lines without touching the root logger, which Flower configures."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
    silence_library_warnings()


def silence_library_warnings() -> None:
    """Hide future/deprecation warnings, unless warnings were configured explicitly (-W, PYTHONWARNINGS)."""
    if sys.warnoptions:
        return
    for category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
