"""User files read safely: regular files only, size-capped before reading, JSON depth-capped, one UserFileError each."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from common.errors import PrimeError
from common.user_files import UserFileError, read_bytes, read_json, safetensors_header


def test_a_regular_file_within_its_limit_is_read(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"k": [1, 2]}))
    assert read_bytes(tmp_path / "a.json", 100) == b'{"k": [1, 2]}'
    assert read_json(tmp_path / "a.json", 100) == {"k": [1, 2]}


def test_what_is_not_a_small_regular_file_is_one_user_file_error(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"x" * 101)
    (tmp_path / "deep.json").write_text("[" * 100 + "]" * 100)
    for path, says in ((tmp_path / "fifo", "not a regular file"), (tmp_path, "not a regular file"),
                       (tmp_path / "none", "cannot read"), (tmp_path / "big", "101 bytes, over the 100-byte limit")):
        with pytest.raises(UserFileError, match=says) as info:
            read_bytes(path, 100)
        assert isinstance(info.value, PrimeError)
    with pytest.raises(UserFileError, match="nested 100 levels deep"):
        read_json(tmp_path / "deep.json", 1000)


def test_a_safetensors_header_is_read_without_the_weights_and_checked_against_its_file(tmp_path):
    save_file({"w": torch.zeros(2, 3)}, tmp_path / "m.safetensors")
    assert safetensors_header(tmp_path / "m.safetensors", ("F32",)) == {"w": ("F32", (2, 3))}
    with pytest.raises(UserFileError):
        safetensors_header(tmp_path / "m.safetensors", ("F16",))  # a dtype the reader does not take
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])  # the header promises more bytes than the file has
    with pytest.raises(UserFileError):
        safetensors_header(tmp_path / "cut.safetensors", ("F32",))
