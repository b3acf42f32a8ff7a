"""Every link in the README and docs/ leads somewhere: a relative file link names a file of the repository, and a
``#section`` part names a heading of that page (as GitHub makes its anchors). An edit that drops or renames a
heading breaks the links that point at it; this finds them."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped (not ``-`` or ``_``), spaces as
    ``-``; a repeated heading gets ``-1``, ``-2``, ..."""
    seen: Counter = Counter()
    found = set()
    for line in prose(page.read_text(encoding="utf-8")):
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
            seen[slug] += 1
    return found


def links(page: Path):
    for number, line in enumerate(prose(page.read_text(encoding="utf-8")), 1):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # not http:, https:, mailto:
                yield number, target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_to_a_file_and_heading(page):
    broken = []
    for number, target in links(page):
        path, _, section = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif section and dest.suffix == ".md" and section not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{section} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_anchors_follow_github():
    page = ROOT / "docs" / "results.md"
    found = anchors(page)
    assert "measured-clsr-clsr--kd-and-lora-at-equal-data" in found  # "+" dropped, both spaces kept
    assert "the-quickstart-make-demo" in found  # backticks and brackets dropped
