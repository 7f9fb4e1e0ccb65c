"""The repository stands on its own: every reference its code and docs make to a document resolves inside
the repository (a file, a section, a METHOD.md step), and none points at a tracker number or at a
machine's folders (docs/TESTING.md, "How the suite is organised")."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".json", ".txt", ".cfg", ".ini", ""}
DOC_NAMES = {p.name for p in (ROOT / "docs").glob("*.md")} | {"README.md"}

# "issue 19", "issues #8", "Issue 15:" — a tracker's numbering means nothing to a reader of the repository
TRACKER = re.compile(r"\bissues? ?#?\d+\b", re.IGNORECASE)
# a machine's folders or the spec documents that live beside the checkout, not in it
OUTSIDE = re.compile(r"shared/docs|/(?:work|Users)/")
# METHOD.md step 4, METHOD.md steps 2-4
METHOD_STEP = re.compile(r"METHOD\.md,? steps? (\d)(?:[-–](\d))?")
# docs/ACCURACY.md, "Any normal domain" or METHOD.md "Features"
SECTION = re.compile(r"\b([A-Z_]+\.md)[,:]? \(?\"([^\"\n]{3,80})\"")
# [text](path#anchor) links between Markdown files
LINK = re.compile(r"\]\(([^)\s]+\.md)(#[^)\s]+)?\)")
# a mention of a Markdown document by name: docs/X.md or X.md (FOREIGN_DOCS are other projects' files:
# PyTorch's RELEASE.md, the data's MANIFEST.md, the checkpoint fixtures' NOTES.md)
DOC_MENTION = re.compile(r"(?<![\w/.-])(?:docs/)?([A-Z][A-Z_]+\.md)\b(?!\))")
FOREIGN_DOCS = {"MANIFEST.md", "NOTES.md", "RELEASE.md"}


@cache
def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / n for n in names if Path(n).suffix in TEXT_SUFFIXES and (ROOT / n).is_file()]


def texts() -> list[tuple[Path, str]]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return [(p, p.read_text(errors="replace")) for p in tracked_text_files()]


@cache
def headings(doc: str) -> list[str]:
    path = ROOT / "docs" / doc if (ROOT / "docs" / doc).is_file() else ROOT / doc
    return [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]


@cache
def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file: its headings' and its explicit ``<a id="...">``."""
    explicit = re.findall(r'<a id="([^"]+)"', path.read_text())
    return {slug(h) for h in headings(path.name)} | set(explicit)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def lines_matching(pattern: re.Pattern[str]) -> list[str]:
    hits = []
    for path, text in texts():
        if path.name == Path(__file__).name:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{n}: {m.group(0)}" for m in pattern.finditer(line)]
    return hits


def test_no_tracker_numbers() -> None:
    assert lines_matching(TRACKER) == []


def test_no_references_outside_the_repository() -> None:
    assert lines_matching(OUTSIDE) == []


def test_every_method_step_cited_exists() -> None:
    steps = {int(m.group(1)) for h in headings("METHOD.md") if (m := re.match(r"Step (\d)", h))}
    missing = []
    for path, text in texts():
        for m in METHOD_STEP.finditer(text):
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
            if not set(range(first, last + 1)) <= steps:
                missing.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert steps >= {1, 2, 3, 4, 5}
    assert missing == []


def test_every_document_named_exists() -> None:
    missing = sorted(
        {
            f"{path.relative_to(ROOT)}: {m.group(1)}"
            for path, text in texts()
            for m in DOC_MENTION.finditer(text)
            if m.group(1) not in DOC_NAMES | FOREIGN_DOCS
        }
    )
    assert missing == []


def test_every_quoted_section_exists() -> None:
    """``docs/X.md, "Section"`` names a heading of X.md (the quoted text is part of the heading, any case)."""
    missing = []
    for path, text in texts():
        for m in SECTION.finditer(text):
            doc, section = m.group(1), m.group(2).lower()
            if doc in DOC_NAMES and not any(section in h.lower() for h in headings(doc)):
                missing.append(f"{path.relative_to(ROOT)}: {doc} {section!r}")
    assert missing == []


def test_markdown_links_resolve() -> None:
    broken = []
    for path, text in texts():
        if path.suffix != ".md":
            continue
        for m in LINK.finditer(text):
            target = (path.parent / m.group(1)).resolve()
            if not target.is_file():
                broken.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
            elif m.group(2) and m.group(2)[1:] not in anchors(target):
                broken.append(f"{path.relative_to(ROOT)}: {m.group(0)} (no such section)")
    assert broken == []
