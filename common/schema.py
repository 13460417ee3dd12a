"""One schema per file kind, checked when the file is read: a malformed file is one line naming it and the field.

Results, saved searches, threat outputs and config files come from disk, where
anything may have been hand-edited, truncated or written by another version.
Each reader declares the fields it uses, with their types and ranges, as a
JSON Schema (the `jsonschema` library) and calls `Schema.check` at the edge,
before it touches the data; past that point readers index the fields without
checks of their own. Wherever a schema says `number`, the number is finite:
Python's json reads `NaN` and `Infinity`, which no reader can use. A schema
may say in its own words what it takes (`says`), for the error message.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(  # finite: not NaN, infinity or an int past float (10**400)
    "number", lambda _, v: isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max)
_Validator = validators.extend(Draft202012Validator, type_checker=_TYPES)
_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a finite number", "boolean": "true or false",
               "array": "a list", "object": "an object", "null": "null"}
_PLURALS = {"string": "strings", "integer": "integers", "number": "finite numbers", "boolean": "booleans",
            "array": "lists", "object": "objects"}
_SHORT = 60  # characters of an offending value quoted in a message


def json_type(kind: type) -> str:
    """The JSON Schema type of a setting's Python type (`bool`, `int`, `float`, `str`)."""
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[kind]


def scalar(kind: str, **more: Any) -> dict[str, Any]:
    """`{"type": kind, ...}`: the common case, spelled short."""
    return {"type": kind, **more}


def listing(items: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **more}


def record(required: Iterable[str] = (), closed: bool = False, **properties: dict[str, Any]) -> dict[str, Any]:
    """An object with these `properties` (others allowed unless `closed`), `required` of them present."""
    spec: dict[str, Any] = {"type": "object", "properties": properties, "required": list(required)}
    return spec | ({"additionalProperties": False} if closed else {})


class Schema:
    """A JSON Schema and the error its readers raise; `check` turns the first violation into one line."""

    def __init__(self, spec: dict[str, Any], error: type[Exception]) -> None:
        _Validator.check_schema(spec)
        self.spec, self.error = spec, error
        self._validator = _Validator(spec)

    def check(self, data: Any, where: str) -> None:
        """Raise `error` naming `where` and the offending field when `data` does not follow the schema."""
        found = next(self._validator.iter_errors(data), None)  # the first in the schema's and the file's order
        if found is not None:
            raise self.error(f"{where}: {describe(found)}")


def describe(error: ValidationError) -> str:
    """One line: which field breaks which rule, with the offending value when it is short."""
    path = list(error.absolute_path)
    rule, value, instance = error.validator, error.validator_value, error.instance
    if rule == "required":
        missing = next(name for name in value if name not in instance)
        return f"{_field([*path, missing])} is missing"
    if rule == "additionalProperties":
        unknown = next(name for name in instance if name not in error.schema.get("properties", {}))
        return f"unknown key {_field([*path, unknown])}"
    if rule == "dependentRequired":
        needing = next(name for name, needs in value.items() if name in instance and any(n not in instance for n in needs))
        return f"{_field([*path, needing])} needs {', '.join(_field([*path, n]) for n in value[needing])}"
    field = _field(path) if path else "the file"
    if "says" in error.schema and rule in ("type", "pattern", "enum"):  # the schema's own words for what it takes
        return f"{field} must be {error.schema['says']}, got {_short(instance)}"
    if rule == "type":
        kinds = [value] if isinstance(value, str) else value
        items = error.schema.get("items", {}).get("type", [])
        items = [items] if isinstance(items, str) else items
        of = f" of {' or '.join(_PLURALS[k] for k in items)}" if items else ""
        words = [_TYPE_WORDS[k] + (of if k == "array" else "") for k in kinds]
        return f"{field} must be {' or '.join(words)}, got {_short(instance)}"
    if rule == "enum":
        return f"{field} must be one of {', '.join(map(str, value))}, got {_short(instance)}"
    if rule == "minItems":
        return f"{field} must not be empty" if value == 1 else f"{field} must have at least {value} items"
    if rule in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[rule]
        return f"{field} must be {sign} {value}, got {_short(instance)}"
    if rule == "minLength":
        return f"{field} must not be empty"
    return f"{field}: {_short(error.message)}"


def _field(path: list[Any]) -> str:
    """`params.alpha`, `trajectory[2].best_so_far`, quoted (repr: a hostile key cannot break the line)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return repr(text)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."
