"""Model folders checked before transformers reads them: the project's own checkpoint passes, a tampered one is refused."""

from __future__ import annotations

import json

import pytest

from common.errors import PrimeError
from common.model_folder import CONFIG_FILE, WEIGHTS_FILE, ModelFolderError, check_model_folder
from common.models import save_checkpoint, tiny_model


@pytest.fixture
def folder(tmp_path):
    return save_checkpoint(*tiny_model(), tmp_path / "model")


def test_a_saved_checkpoint_passes(folder):
    check_model_folder(folder)


@pytest.mark.parametrize("change, says", [
    (lambda c: c | {"model_type": "llama"}, "model_type"),
    (lambda c: c | {"auto_map": {"AutoModel": "x.Model"}}, "auto_map"),
    (lambda c: c | {"hidden_size": -4}, "hidden_size"),
    (lambda c: c | {"rms_norm_eps": float("nan")}, "rms_norm_eps"),
])
def test_a_tampered_config_is_refused_naming_the_field(folder, change, says):
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(change(config)))
    with pytest.raises(ModelFolderError, match=says) as info:
        check_model_folder(folder)
    assert isinstance(info.value, PrimeError)


def test_missing_or_garbage_weights_are_refused(folder):
    (folder / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(ModelFolderError):
        check_model_folder(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelFolderError):
        check_model_folder(folder)
