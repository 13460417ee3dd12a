"""Task specs: every spelling resolves to one LaMP task, and decodings or tie-breaks it cannot use are refused."""

from __future__ import annotations

import pytest

from common.errors import PrimeError
from common.tasks import TaskOptionError, UnknownTaskError, check_decoding, check_tie_break, completion_text, get_task


@pytest.mark.parametrize("name", ["LaMP_2", "LaMP-2", "lamp2", "tagging", " tagging "])
def test_every_spelling_names_the_same_task(name):
    assert get_task(name) is get_task("LaMP_2")


def test_an_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError, match="unknown task 'LaMP_9' \\(known: .*LaMP_2.*tagging") as info:
        get_task("LaMP_9")
    assert isinstance(info.value, PrimeError)


def test_mean_and_median_need_ordered_labels_and_the_expected_tie_break_a_label_task():
    check_decoding(get_task("rating"), "median")
    check_tie_break(get_task("rating"), "expected")
    with pytest.raises(TaskOptionError, match="needs ordered numeric labels"):
        check_decoding(get_task("tagging"), "expected")
    with pytest.raises(TaskOptionError, match="needs a label task"):
        check_tie_break(get_task("headline"), "expected")
    with pytest.raises(TaskOptionError, match="decoding must be one of"):
        check_decoding(get_task("rating"), "beam")


def test_a_completion_is_the_target_after_one_space():
    assert completion_text("  4 \n") == " 4"
