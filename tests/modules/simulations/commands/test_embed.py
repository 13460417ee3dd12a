"""`prime-fl embed`: one normalised embedding per user, and bad input refused in one line with nothing written."""

from __future__ import annotations

import numpy as np
from lamp_sets import tagging_records

from common.encoder import load_embeddings
from simulations.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_hashing(tmp_path, capsys):
    data = tmp_path / "d"
    _run(capsys, "data", "synth", "--task", "rating", "--out", str(data), "--users", "5", "--groups", "2", "--history", "3")
    code, out, _ = _run(capsys, "embed", "--data", str(data), "--out", str(tmp_path / "e.npz"), "--encoder", "hashing:16")
    assert code == 0 and "5 user embeddings (dim 16" in out
    emb = load_embeddings(tmp_path / "e.npz")
    assert list(emb) == [f"u{i:03d}" for i in range(5)]
    assert np.allclose([np.linalg.norm(v) for v in emb.values()], 1.0, atol=1e-6)


def test_embed_errors(tmp_path, capsys, write_lamp_dir):
    code, _, err = _run(capsys, "embed", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "e.npz"))
    assert code == 2 and "not a directory" in err
    folder = write_lamp_dir(*tagging_records())
    code, _, err = _run(capsys, "embed", "--data", str(folder), "--out", str(tmp_path / "e.npz"), "--encoder", "word2vec")
    assert code == 2 and "unknown encoder 'word2vec'" in err
    assert not (tmp_path / "e.npz").exists()
