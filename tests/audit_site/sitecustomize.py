"""Test-only: an audit hook in every Python process of a deployment, recording opens under a watched folder.

Put this folder on PYTHONPATH and set PRIME_FL_AUDIT_WATCH (the folder to
watch) and PRIME_FL_AUDIT_LOG (where to write). Python imports
`sitecustomize` at start-up, so every process the deployment spawns
(SuperLink, SuperNodes, the ServerApp and ClientApp processes) inherits the
hook through its environment. Each process writes `<pid>.tsv` in the log
folder: a first line with its command line (which tells the ServerApp
process from a ClientApp one), then one line per file open, directory
listing or scan of a path under the watched folder. Recording instead of
raising: a raise inside the app could be caught and the run would go on
unchecked; a record is asserted on afterwards.
"""

import os
import sys

_WATCH = os.environ.get("PRIME_FL_AUDIT_WATCH", "")
_LOG = os.environ.get("PRIME_FL_AUDIT_LOG", "")


def _install(watch: str, log_dir: str) -> None:
    watch = os.path.realpath(watch) + os.sep
    log_file = os.path.join(log_dir, f"{os.getpid()}.tsv")
    busy = []

    def write(line: str) -> None:
        busy.append(True)  # the log file's own open must not be audited
        try:
            with open(log_file, "a", encoding="utf-8") as out:
                out.write(line.replace("\n", " ") + "\n")
        finally:
            busy.pop()

    def hook(event: str, args: tuple) -> None:
        if busy or event not in ("open", "os.listdir", "os.scandir") or not args or args[0] is None:
            return
        path = args[0]
        if isinstance(path, int):
            return
        path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if path and (os.path.realpath(path) + os.sep).startswith(watch):
            write(f"{event}\t{path}")

    write("argv\t" + " ".join(sys.argv))
    sys.addaudithook(hook)


if _WATCH and _LOG:
    _install(_WATCH, _LOG)
