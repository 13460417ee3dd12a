"""Output kinds of the simulation commands: each folder kind takes its own earlier outputs and refuses a user's folder."""

from __future__ import annotations

import pytest

from common.atomic import OutputError, check_output_folder
from simulations.support.outputs import DEPLOY_OUTPUT, EVAL_OUTPUT, GPU_CHECK_OUTPUT, THREATS_OUTPUT


@pytest.mark.parametrize("kind, files", [
    (EVAL_OUTPUT, ["results.json", "config.json", "table.md"]),
    (EVAL_OUTPUT, ["diff.md", "diff.json", "table.md", "table.csv", "table.json"]),
    (THREATS_OUTPUT, ["leak.json", "recovery.md"]),
    (DEPLOY_OUTPUT, ["deploy.json"]),
])
def test_an_earlier_output_of_the_kind_written_before_the_marker_is_taken(tmp_path, kind, files):
    for name in files:
        (tmp_path / name).write_text("{}")
    assert check_output_folder(tmp_path, kind) == tmp_path


@pytest.mark.parametrize("kind", [EVAL_OUTPUT, THREATS_OUTPUT, DEPLOY_OUTPUT, GPU_CHECK_OUTPUT])
def test_a_users_folder_is_refused_by_every_kind(tmp_path, kind):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError):
        check_output_folder(tmp_path, kind)
