"""Schema.check: the first violation of a file becomes one line naming the file, the field and the rule."""

from __future__ import annotations

import pytest

from common.errors import PrimeError
from common.schema import Schema, json_type, listing, record, scalar


class _FileError(PrimeError):
    pass


SCHEMA = Schema(record(["alpha", "seeds"], closed=True, alpha=scalar("number", minimum=0),
                       seeds=listing(scalar("integer"), minItems=1), name=scalar("string", minLength=1)), _FileError)


def test_a_valid_file_passes():
    SCHEMA.check({"alpha": 0.5, "seeds": [0, 1], "name": "x"}, "results.json")


@pytest.mark.parametrize("data, says", [
    ({"seeds": [0]}, "results.json: 'alpha' is missing"),
    ({"alpha": "2", "seeds": [0]}, "results.json: 'alpha' must be a finite number, got '2'"),
    ({"alpha": float("nan"), "seeds": [0]}, "results.json: 'alpha' must be a finite number, got nan"),
    ({"alpha": -1, "seeds": [0]}, "results.json: 'alpha' must be >= 0, got -1"),
    ({"alpha": 1, "seeds": []}, "results.json: 'seeds' must not be empty"),
    ({"alpha": 1, "seeds": [0, "1"]}, "results.json: 'seeds[1]' must be an integer, got '1'"),
    ({"alpha": 1, "seeds": [0], "extra\nkey": 1}, "results.json: unknown key 'extra\\nkey'"),
    ([1], "results.json: the file must be an object, got [1]"),
])
def test_each_violation_is_one_line_naming_the_field(data, says):
    with pytest.raises(_FileError) as info:
        SCHEMA.check(data, "results.json")
    assert str(info.value) == says and "\n" not in str(info.value)


def test_setting_types_map_to_json_types_and_a_bad_schema_is_refused_at_once():
    assert [json_type(t) for t in (bool, int, float, str)] == ["boolean", "integer", "number", "string"]
    with pytest.raises(Exception, match="is not valid"):
        Schema({"type": "no-such-type"}, _FileError)


def test_an_integer_too_large_for_a_float_is_not_a_finite_number():
    """JSON keeps 10**400 an int: math.isfinite raised OverflowError inside the check (a traceback, not a line)."""
    with pytest.raises(_FileError, match=r"^results\.json: 'alpha' must be a finite number") as info:
        SCHEMA.check({"alpha": 10**400, "seeds": [0]}, "results.json")
    assert "\n" not in str(info.value)
    SCHEMA.check({"alpha": 2**1000, "seeds": [10**400]}, "results.json")  # a float holds it; integers are exact
