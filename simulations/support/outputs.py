"""The kinds of output folder the simulation commands write file by file (see `common.atomic.OutputKind`).

One kind per family of commands that share a folder: `eval` runs, and the
tables, plots, comparisons and trade-offs drawn from them (`eval table --out`
may name the run itself), are all `eval` outputs. The layouts recognise
folders written before the marker existed by files only these commands write.
The federation's run folder (`prime-fl simulate`) is the ServerApp's output
too, so its kind lives with the run report (`server.report.RUN_OUTPUT`).
"""

from __future__ import annotations

from common.atomic import Layout, OutputKind

_TABLE = frozenset({"table.md", "table.csv", "table.json"})

EVAL_OUTPUT = OutputKind("eval", (
    Layout(frozenset({"results.json"}),
           ("config.json", "cells", "prepare", "data", "plots", "table.*", "paired.*", "compare.*")),  # a run
    Layout(_TABLE | {"paired.md", "paired.json"}, ("results.json", "plots", "compare.*")),  # eval table --out
    Layout(_TABLE | {"diff.md", "diff.json"}),  # eval diff --out
    Layout(frozenset({"compare.md", "compare.json"})),  # eval compare --out
    Layout(frozenset({"index.json"}), ("*.png", "*.csv", "*.json")),  # plots/, eval tradeoffs --out
    Layout(frozenset({"release_audit.json"}), ("release_audit.md",)),  # python -m simulations.evaluation.release_audit
))

THREATS_OUTPUT = OutputKind("threats", (
    *(Layout(frozenset(required), ("embedding.*", "membership.*", "leak.*", "recovery.*"))
      for required in ({"embedding.json"}, {"membership.json"}, {"leak.json"}, {"recovery.json"})),
    # guards_summary's folder: run folders and their summary (it writes only where it found a run to summarize)
    Layout(frozenset(), ("rank*-cap*-seed*", "summary.json", "summary.md")),
))

DEPLOY_OUTPUT = OutputKind("deploy", (Layout(frozenset({"deploy.json"}), ("logs", "certs", "keys", "flwr-home", "app-out")),))

GPU_CHECK_OUTPUT = OutputKind("gpu-check")
