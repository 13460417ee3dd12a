"""Progress of long phases as plain log lines, so that it survives being relayed as text.

Flower relays a ServerApp's output line by line (`flwr run --stream`, a
deployment's log), where no progress bar can be drawn. The ServerApp logs
`progress NAME DONE/TOTAL key=value ...` instead: readable as it is in a log,
and `parse()` lets whoever shows the output (`prime-fl simulate`) turn the
lines back into a bar.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_LINE = re.compile(r"\bprogress (?P<name>\S.*?) (?P<done>\d+)/(?P<total>\d+)(?P<info>(?: [\w-]+=\S+)*)\s*$")


@dataclass(frozen=True)
class Progress:
    """`done` of `total` steps of the phase `name`, with a few display values (e.g. the best objective so far)."""

    name: str
    done: int
    total: int
    info: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        extra = "".join(f" {key}={value}" for key, value in self.info.items())
        return f"progress {self.name} {self.done}/{self.total}{extra}"


def report(name: str, done: int, total: int, **info: str) -> None:
    """Log one progress step at INFO (on this module's logger, which the apps show)."""
    log.info(Progress(name, done, total, dict(info)).line())


def parse(line: str) -> Progress | None:
    """The progress step in a relayed output line (log prefix allowed), or None for any other line."""
    match = _LINE.search(line.rstrip("\n"))
    if match is None:
        return None
    info = dict(item.split("=", 1) for item in match["info"].split())
    return Progress(match["name"], int(match["done"]), int(match["total"]), info)
