"""Command-line options derived from settings records (`common.settings`).

A command that takes search or node settings adds them with
`add_setting_options` and reads them back with `setting_values`, so its
flags, help texts, defaults and checks are the record's own.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Collection, Mapping

from common.settings import Option, SettingError, coerce, options


def add_setting_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    current: Any,
    *,
    layered: bool = False,
    sweeps: Mapping[str, tuple] | None = None,
    skip: Collection[str] = (),
) -> None:
    """One flag per exposed setting of the record `current`, showing its value there as the default.

    `current` may be a record class: its declared defaults are shown (a
    record that cannot be built without required values, as `EvalConfig`).

    `layered`: flags default to None, so that values from a config file
    under them are kept unless a flag is given. `sweeps`: a swept setting
    (an ablation axis) takes a comma-separated list under its plural flag
    instead, `sweeps` giving the default values shown. `skip`: keys whose
    flag the command has already (a setting two records share).
    """
    record = current if isinstance(current, type) else type(current)
    for opt in options(record, exposed_only=True):
        if opt.key in skip:
            continue
        value = opt.value_in(current)
        if sweeps is not None and opt.sweep:
            shown = _shown(sweeps.get(opt.name, (value,)))
            parser.add_argument(f"--{opt.sweep}", help=f"comma-separated: {opt.help} (ablation axis; default {shown})")
        elif opt.kind is bool:  # a switch: --name / --no-name
            parser.add_argument(f"--{opt.key}", action=argparse.BooleanOptionalAction, default=None if layered else value,
                                help=f"{opt.help} (default {'on' if value else 'off'})")
        else:
            shown = "" if value is None else f" (default {_shown(value) if isinstance(value, tuple) else value})"
            parser.add_argument(f"--{opt.key}", type=_typed(opt), default=None if layered else value,
                                help=opt.help + shown)


def add_setting_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, current: Any, name: str) -> None:
    """The flag of one setting (by field name) of the record `current`, for a command that takes only that one."""
    (opt,) = [o for o in options(type(current), exposed_only=True) if o.name == name]
    value = opt.value_in(current)
    parser.add_argument(f"--{opt.key}", type=_typed(opt), default=value, help=f"{opt.help} (default {value})")


def setting_values(record: type, args: argparse.Namespace) -> dict[str, Any]:
    """{key: value} of the record's exposed settings given on the command line (None: not given)."""
    given = {opt.key: getattr(args, opt.key.replace("-", "_"), None) for opt in options(record, exposed_only=True)}
    return {key: value for key, value in given.items() if value is not None}


def _shown(values: tuple) -> str:
    """A list as its flag takes it: comma-separated, floats short, '' for none."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "''"


def _typed(opt: Option) -> Callable[[str], Any]:
    """An argparse `type` that parses the flag as the setting's type (its range is checked with the record)."""

    def parse(text: str) -> Any:
        try:
            return coerce(opt, text)
        except SettingError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = getattr(opt.kind, "__name__", "value")
    return parse
