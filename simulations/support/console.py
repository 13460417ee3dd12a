"""What `prime-fl simulate` shows of a relayed Flower run: our own lines, progress as bars, the rest only with -v.

Flower streams everything the ServerApp process and its Ray actors write:
Flower's own INFO/DEBUG lines, Ray and transformers warnings, each actor's
output. By default only our loggers' lines (and anything at ERROR) pass, and
`common.progress` lines become a progress bar on a terminal (a plain line per
step elsewhere, e.g. in a CI log). The whole stream stays in the run's log file.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

from tqdm import tqdm

from common.logs import OWN_LOGGERS
from common.progress import Progress, parse

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OWN_LINE = re.compile(r"^\S+ \S+ [A-Z]+ (?:" + "|".join(OWN_LOGGERS) + r")(?:\.[\w.]+)?: ")
_ERROR = re.compile(r"\bERROR\b")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception): ")  # the last line of a traceback: what went wrong

# Environment for the processes of a run (SuperLink, ServerApp, Ray actors): their
# libraries' progress bars and advisory warnings off at the source, where a filter
# on the relayed text would come too late (bars rewrite lines, warnings span two).
QUIET_ENV = {
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def shown(line: str, verbose: bool) -> bool:
    """Whether a relayed line reaches the user: with `verbose` every line, else ours, errors and raised exceptions."""
    text = _ANSI.sub("", line)
    return verbose or bool(_OWN_LINE.match(text) or _ERROR.search(text) or _RAISED.match(text))


class RelayedRun:
    """Prints the shown lines of a relayed run to `out`, drawing progress lines as one bar per phase."""

    def __init__(self, out: TextIO | None = None, verbose: bool = False) -> None:
        self.out = out or sys.stdout  # looked up per run: pytest and redirections replace sys.stdout
        self.verbose = verbose
        self.bars = self.out.isatty()
        self._bar: tqdm | None = None
        self._bar_name = ""

    def feed(self, line: str) -> None:
        step = parse(_ANSI.sub("", line))
        if step is not None:
            self._progress(step)
        elif shown(line, self.verbose):
            self._finish_bar()
            self.out.write(line if line.endswith("\n") else line + "\n")
            self.out.flush()

    def _progress(self, step: Progress) -> None:
        if not self.bars:
            self.out.write(step.line() + "\n")
            self.out.flush()
            return
        if self._bar is None or self._bar_name != step.name:
            self._finish_bar()
            self._bar = tqdm(total=step.total, desc=step.name, unit="step", file=self.out, leave=True)
            self._bar_name = step.name
        self._bar.update(step.done - self._bar.n)
        self._bar.set_postfix(step.info)
        if step.done >= step.total:
            self._finish_bar()

    def _finish_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._finish_bar()
