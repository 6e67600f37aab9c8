"""Every relative link and image of README.md, docs/*.md and comfyui/README.md points to a file of
the checkout (as on a fresh clone and in the rendered page), and every `#anchor` to a heading of
its target, named as GitHub names them. Links inside code blocks are not links."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "comfyui" / "README.md"]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _heading_text(line: str) -> str:
    """A heading's text as rendered: code spans keep their content, link markup goes."""
    text = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line).group(1)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return text.replace("`", "")


def anchors(page: pathlib.Path) -> set[str]:
    """The `#anchors` GitHub gives the headings of `page`: the rendered text in lower case,
    punctuation dropped, spaces to hyphens; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code or not re.match(r"^#{1,6}\s", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", _heading_text(line).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(page: pathlib.Path) -> list[str]:
    """Each relative link of `page` that does not resolve, with the reason."""
    problems = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = page if not path_part else (page.parent / path_part).resolve()
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif not dest.resolve().is_relative_to(REPO):
            problems.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    return problems


def prose(text: str) -> str:
    """`text` without fenced code blocks; inline code spans go too, except when they are a link's text."""
    lines, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            lines.append(re.sub(r"(?<!\[)`[^`]*`(?!\])", "``", line))
    return "\n".join(lines)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
    assert page.exists(), page
    assert broken_links(page) == []


def test_the_checker_finds_broken_links_and_anchors(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "other.md").write_text("# Other page\n\n## The `--json` object (exit codes)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#the---json-object-exit-codes) ![ok](other.md) [ok](#page)\n"
        "[web](https://example.com/x) `[code](missing.md)`\n\n```\n[code](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#nothing) [[`x`](gone2.md)]\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nothing: no heading #nothing in other.md",
        "gone2.md: no such file",
    ]
