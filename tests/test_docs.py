"""Every ``python`` code block of README.md and docs/*.md runs, page by page, in one namespace per page."""

from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FRAGMENTS = {
    # Pages whose blocks still use names defined only in the surrounding prose (objective, apply_fn, ...).
    # Make each self-contained, then remove it from this set.
    "convexity.md", "curvature.md", "determinism.md", "merging.md", "surfaces.md",
}
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: pathlib.Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p) and p.name not in FRAGMENTS], ids=lambda p: p.name)
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(blocks(page)):
        exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)  # noqa: S102
