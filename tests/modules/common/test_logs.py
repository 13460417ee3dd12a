"""Logging setup: our own loggers at INFO, other libraries at WARNING, library deprecation noise hidden unless asked."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest

from common import logs


@pytest.fixture
def clean_logging(monkeypatch):
    """Leave the process's logging and warning filters as they were."""
    root = logging.getLogger()
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in logs.OWN_LOGGERS}
    monkeypatch.setattr(root, "level", root.level)
    with warnings.catch_warnings():
        yield
    for name, (level, handlers) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers = handlers


def _bare_root(monkeypatch) -> None:
    """No handler on the root logger (pytest adds its capture handlers), as in a fresh `prime-fl` process."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def test_the_command_line_shows_our_info_and_hides_library_info(clean_logging, monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", [])
    _bare_root(monkeypatch)
    logs.setup_command_line(verbose=False)
    assert all(logging.getLogger(name).getEffectiveLevel() == logging.INFO for name in logs.OWN_LOGGERS)
    assert logging.getLogger("some.library").getEffectiveLevel() == logging.WARNING
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("old", DeprecationWarning)
        warnings.warn("real", UserWarning)
    assert [str(w.message) for w in caught] == ["real"]


def test_verbose_shows_everything_and_explicit_warning_options_win(clean_logging, monkeypatch):
    _bare_root(monkeypatch)
    logs.setup_command_line(verbose=True)
    assert logging.getLogger("server").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("some.library").getEffectiveLevel() == logging.DEBUG
    monkeypatch.setattr(sys, "warnoptions", ["default"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.silence_library_warnings()
        warnings.warn("old", DeprecationWarning)
    assert [str(w.message) for w in caught] == ["old"]


def test_an_app_process_gets_one_handler_per_own_logger_and_leaves_the_root_alone(clean_logging):
    for name in logs.OWN_LOGGERS:
        logging.getLogger(name).handlers = []
    root = list(logging.getLogger().handlers)
    logs.setup_app()
    logs.setup_app()  # a second call adds no second handler
    assert all(len(logging.getLogger(name).handlers) == 1 for name in logs.OWN_LOGGERS)
    assert logging.getLogger().handlers == root


def test_a_library_that_sets_its_own_logger_to_debug_stays_quiet_on_the_command_line(clean_logging, monkeypatch, capsys):
    """bm25s sets its logger to DEBUG on import; its "Building index" lines filled eval logs, one per target."""
    monkeypatch.setattr(sys, "warnoptions", [])
    _bare_root(monkeypatch)
    chatty = logging.getLogger("chatty.library")
    monkeypatch.setattr(chatty, "level", logging.DEBUG)
    logs.setup_command_line(verbose=False)
    chatty.debug("Building index from IDs objects")
    chatty.info("loaded")
    chatty.warning("disk almost full")
    logging.getLogger("simulations.grid").info("12 cells")
    err = capsys.readouterr().err
    assert "Building index" not in err and "loaded" not in err
    assert "disk almost full" in err and "12 cells" in err


def test_verbose_lets_a_chatty_library_through(clean_logging, monkeypatch, capsys):
    _bare_root(monkeypatch)
    chatty = logging.getLogger("chatty.library")
    monkeypatch.setattr(chatty, "level", logging.DEBUG)
    logs.setup_command_line(verbose=True)
    chatty.debug("Building index from IDs objects")
    assert "Building index" in capsys.readouterr().err
