"""Every Python block that README.md or docs/*.md marks runnable is run here, offline, on tiny models.

A block is runnable when the line right before its opening fence is ``<!-- run -->``. The runnable
blocks of one document share one namespace in document order (a later block may use an earlier one's
names), and run in a fresh temporary working directory with downloads forbidden. Blocks that need
real weights, a GPU or a server stay unmarked; they show the same calls as a marked tiny block.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- run -->"
FENCE = re.compile(r"^```python\s*$")


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, source)`` of each block whose fence follows the marker line."""
    lines = text.splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if line.strip() == MARKER:
            fence = index + 1
            if fence >= len(lines) or not FENCE.match(lines[fence]):
                raise AssertionError(f"line {index + 1}: {MARKER} must be followed by a ```python fence")
            end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
            blocks.append((fence + 1, "\n".join(lines[fence + 1:end])))
    return blocks


def test_marker_parser_finds_blocks():
    text = "intro\n<!-- run -->\n```python\nx = 1\n```\n```python\nnot_run()\n```\n"
    assert runnable_blocks(text) == [(3, "x = 1")]


def test_readme_has_runnable_blocks():
    assert len(runnable_blocks((ROOT / "README.md").read_text())) >= 3


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if MARKER in d.read_text()],
                         ids=lambda d: str(d.relative_to(ROOT)))
def test_runnable_blocks(document: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REWARDKIT_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from a second thread
    namespace: dict = {"__name__": "__docs__"}
    try:
        for line, source in runnable_blocks(document.read_text()):
            code = compile(source, f"{document.name}:{line}", "exec")
            exec(code, namespace)  # noqa: S102 - the project's own documentation
    finally:
        torch.set_num_threads(threads)
    assert os.getcwd() == str(tmp_path)


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_links_stay_in_the_repository_and_resolve(document: Path):
    """README and docs link only to files of this repository (a clone has no ../shared, and no network)."""
    text = document.read_text()
    assert "../shared" not in text, f"{document.name} mentions ../shared, which a clone does not have"
    for target in LINK.findall(text):
        path = target.split("#", 1)[0]
        assert "://" not in target, f"{document.name}: {target} leaves the repository"
        if path:
            assert (document.parent / path).resolve().exists(), f"{document.name}: broken link {target}"
