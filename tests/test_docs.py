"""
README.md and docs/*.md: every command runs, every configuration block
parses, shown output matches (the harness is C{tests/docblocks.py}).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sybil import Example

from tests import docblocks
from tests.docblocks import CHECKED, Harness

#: (document, text in the block) -> why it fails today; strict, so a fix
#: turns the test red until the entry goes
#: (document, a snippet of the block) -> why it fails today; each one is a
#: strict xfail, so the entry must go once the block passes
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def params() -> Iterator[object]:
    for example in docblocks.examples():
        block: docblocks.Block = example.parsed
        marks: list[pytest.MarkDecorator] = []
        if block.language in ("console", "sh"):
            marks.append(pytest.mark.integration)
        for (path, snippet), reason in KNOWN_FAILURES.items():
            if block.path == path and snippet in block.source:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
        yield pytest.param(example, id=block.id, marks=marks)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness.open()
    finally:
        harness.close()


@pytest.mark.parametrize("example", list(params()))
def test_block(example: Example, harness: Harness) -> None:
    example.namespace["harness"] = harness
    example.evaluate()


@pytest.mark.parametrize(
    "path", docblocks.documents(), ids=lambda p: str(p.relative_to(docblocks.ROOT))
)
def test_every_code_block_is_fenced(path: Path) -> None:
    # An indented block has no language, so the harness would not see it.
    assert docblocks.unfenced_blocks(path.read_text()) == [], (
        "indented code blocks: make them fenced blocks with a language"
    )


def test_the_documents_have_checked_blocks() -> None:
    # A parser that found nothing would pass every document.
    blocks = [e.parsed for e in docblocks.examples()]
    found = {block.path for block in blocks if block.language in CHECKED}
    assert {"README.md", "docs/deploy.md", "docs/protocol-chat.md"} <= found


def test_code_names_existing_performance_sections() -> None:
    # Figures live in docs/performance.md; a comment names the section.
    headings = {
        line.lstrip("#").strip().replace("`", "")
        for line in (docblocks.ROOT / "docs" / "performance.md")
        .read_text()
        .splitlines()
        if line.startswith("#")
    }
    named = {
        (path.name, section)
        for path in sorted((docblocks.ROOT / "sockd").rglob("*.py"))
        for section in re.findall(
            r'docs/performance\.md,\s*(?:#:?\s*)?"([^"]+)"',
            re.sub(r"\n\s*#:?\s*", " ", path.read_text()),
        )
    }
    assert named, "no comment names a section"
    assert {(f, s) for f, s in named if s not in headings} == set()
