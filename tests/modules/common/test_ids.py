"""User ids that could escape a folder or break a file name are refused at the edge."""

from __future__ import annotations

import pytest

from common.ids import InvalidIdError, check_user_id, is_safe_id


@pytest.mark.parametrize("good", ["u000", "LaMP_4-60", "a", "user.1", "x" * 128])
def test_safe_ids_pass(good):
    assert is_safe_id(good) and check_user_id(good) == good


@pytest.mark.parametrize("bad", ["", "../../x", "..", ".", "u 000", "a/b", "a\\b", "-rf", ".hidden", "x" * 129,
                                 "u\x00", "ü", 5, None, ["u1"]])
def test_unsafe_ids_are_refused_with_the_place_named(bad):
    assert not is_safe_id(bad)
    with pytest.raises(InvalidIdError, match="register reply"):
        check_user_id(bad, "register reply")
