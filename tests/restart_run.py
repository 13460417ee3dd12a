"""One coordinator run over the in-process grid, optionally killed with SIGKILL at a chosen point.

Run by tests/promises/test_restart.py as `python tests/restart_run.py OUT_DIR REUSE KILL_AT`; KILL_AT is
`none`, `after-register`, `after-adapt`, `after-share` (phase boundaries: the coordinator's
checkpoints) or `mid-share` (after the second sharer's upload is stored).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from client.app import app as client_app  # noqa: E402
from inprocess_grid import InProcessGrid, tiny_config  # noqa: E402
from server.coordinator import Coordinator  # noqa: E402
from server.registry import Registry  # noqa: E402

BOUNDARIES = {"after-register": 1, "after-adapt": 2, "after-share": 3}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(out_dir: str, reuse: bool, kill_at: str) -> None:
    torch.set_num_threads(1)
    if kill_at in BOUNDARIES:
        checkpoint, calls = Coordinator._checkpoint, []

        def checkpoint_then_die(self) -> None:
            checkpoint(self)
            calls.append(1)
            if len(calls) == BOUNDARIES[kill_at]:
                _die()

        Coordinator._checkpoint = checkpoint_then_die
    elif kill_at == "mid-share":
        add, stored = Registry.add, []

        def add_then_die(self, *args, **kwargs):
            result = add(self, *args, **kwargs)
            stored.append(1)
            if len(stored) == 2:
                _die()
            return result

        Registry.add = add_then_die
    config = tiny_config(out_dir, reuse_registry=reuse)
    Coordinator(grid=InProcessGrid(client_app, 10), config=config, registry_key=b"k" * 32).run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "true", sys.argv[3])
