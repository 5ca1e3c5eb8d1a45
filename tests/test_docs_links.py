"""Every relative link and image in the README and the guides points at a file that exists.

Covers README.md, docs/*.md and results/bench/README.md. Links inside code (fenced blocks and
inline code spans) are not links; web and mail links are not checked; an anchor (`#...`) is
stripped before the path is resolved against the linking file's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "results" / "bench" / "README.md"]
)

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[^\S\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
# [text](target "title") and ![alt](target): the target is <...> or runs to a space or ")".
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+[^)]*)?\)")
# [label]: target
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
HTML = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)


def links(text: str) -> list[str]:
    """The link and image targets of a Markdown text, outside code."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    found = [m.group(1) for pattern in (INLINE, REFERENCE, HTML) for m in pattern.finditer(text)]
    return [target.strip("<>") for target in found]


def local_path(document: Path, target: str) -> Path | None:
    """The file a relative link points at, or None for web, mail and same-page links."""
    if EXTERNAL.match(target):
        return None
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    if not path:
        return None
    return (ROOT / path.lstrip("/")) if path.startswith("/") else document.parent / path


def test_the_documents_exist():
    assert (ROOT / "README.md").is_file()
    assert (ROOT / "results" / "bench" / "README.md").is_file()
    assert len(DOCUMENTS) > 2, "no guides found in docs/"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: Path):
    broken = []
    for target in links(document.read_text(encoding="utf-8")):
        path = local_path(document, target)
        if path is not None and not path.exists():
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)}: links to missing files: {broken}"


def test_the_link_parser():
    text = (
        "See [a](docs/a.md#part), ![fig](x.png), [b](<has space.md>), [c](c.md 'title'),\n"
        "[web](https://example.com), [mail](mailto:x@y), [here](#anchor), `[no](code.md)`\n"
        "```\n[not](fenced.md)\n```\n"
        "[ref]: ref.md\n"
    )
    assert links(text) == [
        "docs/a.md#part",
        "x.png",
        "has space.md",
        "c.md",
        "https://example.com",
        "mailto:x@y",
        "#anchor",
        "ref.md",
    ]
    document = ROOT / "docs" / "guide.md"
    assert local_path(document, "https://example.com") is None
    assert local_path(document, "mailto:x@y") is None
    assert local_path(document, "#anchor") is None
    assert local_path(document, "../README.md#top") == ROOT / "docs" / ".." / "README.md"
