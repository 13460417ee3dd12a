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
        # A library may set its own logger's level (bm25s sets DEBUG on import), which the root's level does not
        # override for records that propagate; the filter on the root's handlers does.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_own_or_warning)
        silence_library_warnings()


def _own_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_LOGGERS


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


_library_bars = True  # off after `hide_library_progress`, for the bars a call site asks a library for


def hide_library_progress() -> None:
    """For `--no-progress`: also hide the bars libraries draw themselves (transformers' "Loading weights", the
    sentence encoder's "Batches"), which otherwise fill a background run's log once per model load or embedding."""
    global _library_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    _library_bars = False


def library_progress_shown() -> bool:
    """Whether a call that can ask a library for a bar of its own (sentence-transformers' `show_progress_bar`)
    may: false after `hide_library_progress`."""
    return _library_bars


def silence_library_warnings() -> None:
    """Hide future/deprecation warnings, unless warnings were configured explicitly (-W, PYTHONWARNINGS)."""
    if sys.warnoptions:
        return
    for category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
