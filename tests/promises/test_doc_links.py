"""The docs' links and the committed figures code reads: a moved folder (docs/results -> results) breaks neither;
and the Flower app bundle leaves the committed results out."""

from __future__ import annotations

import re
from pathlib import Path

from simulations.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").rglob("*.md"))]


def test_every_relative_link_of_the_docs_and_results_resolves_inside_the_repository():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or an anchor on the same page
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or not path.is_relative_to(ROOT):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert len(PAGES) > 30 and not broken, broken


def test_no_doc_cites_the_design_card_outside_the_repository():
    code = [path for package in ("common", "client", "server", "simulations") for path in (ROOT / package).rglob("*.py")]
    pages = [*PAGES, *code]
    assert not [page for page in pages if "DESIGN.md" in page.read_text(encoding="utf-8")]


def test_the_gpu_check_divides_by_the_committed_cpu_figure():
    assert gpu_check.CPU_REFERENCE.is_file() and gpu_check.CPU_REFERENCE.is_relative_to(ROOT / "results")


def test_the_flower_app_bundle_leaves_the_results_out():
    """`flwr run .` ships the project to every node as a FAB of at most 10 MB; the committed results (8 MB of JSON,
    which Flower's default patterns include) brought it to 9.5 MB, one result folder from refusing to start."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "server/app.py" in names and "client/app.py" in names
    assert not [name for name in names if name.startswith("results/")] and len(fab) < 2 * 2**20, len(fab)
