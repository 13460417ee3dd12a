"""safe_json.loads: JSON under its size and depth caps parses as `json.loads` does; anything else is UnsafeJsonError."""

from __future__ import annotations

import json

import pytest

from common.errors import PrimeError
from common.safe_json import UnsafeJsonError, loads, nesting_depth


def test_valid_json_parses_like_json_loads_and_brackets_inside_strings_do_not_count():
    text = json.dumps({"a": [1, {"b": "[[[[{{{"}], "c": "\\\"]"})
    assert loads(text) == json.loads(text) and loads(text.encode()) == json.loads(text)
    assert nesting_depth(text) == 3


@pytest.mark.parametrize("data, says", [
    ("[" * 100 + "]" * 100, "nested 100 levels deep, over the limit of 64"),
    (b"\xff{}", "not UTF-8 (bad byte at offset 0)"),
    ("{'a': 1}", "not JSON"),
    ("1" * 5000, "not usable JSON"),
])
def test_hostile_text_is_one_prime_error(data, says):
    with pytest.raises(UnsafeJsonError, match=says.replace("(", r"\(").replace(")", r"\)")) as info:
        loads(data)
    assert isinstance(info.value, PrimeError) and "\n" not in str(info.value)


def test_the_size_cap_counts_utf8_bytes_before_parsing():
    assert loads(b"[1, 2]", max_bytes=6) == [1, 2]
    with pytest.raises(UnsafeJsonError, match="7 bytes of JSON, over the 6-byte limit"):
        loads(b"[1, 22]", max_bytes=6)
    with pytest.raises(UnsafeJsonError, match="over the 6-byte limit"):
        loads('"' + "é" * 6 + '"', max_bytes=6)  # text: 8 characters, 14 bytes
    with pytest.raises(UnsafeJsonError, match="over the 8-byte limit"):
        loads('"' + "é" * 4 + '"', max_bytes=8)  # text: 6 characters, under the limit, but 10 bytes
    assert loads('"' + "é" * 3 + '"', max_bytes=8) == "é" * 3  # 5 characters, 8 bytes: at the limit
    assert loads("[[1]]", max_depth=2) == [[1]]


def test_a_key_given_twice_is_refused_only_where_asked():
    """json keeps the last of two equal keys without a word; a file whose meaning that changes asks to refuse it."""
    text = '{"a": {"u1": 0, "u1": 1}}'
    assert loads(text) == {"a": {"u1": 1}}
    with pytest.raises(UnsafeJsonError, match="'u1' twice"):
        loads(text, unique_keys=True)
    assert loads('{"u1": 0, "u2": {"u1": 1}}', unique_keys=True) == {"u1": 0, "u2": {"u1": 1}}
