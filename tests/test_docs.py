"""The repository documents itself: no reference to documents outside it, every ``docs/<page>.md §N``
citation resolves to a numbered heading of that page, and every relative markdown link points at a file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SUFFIXES = (".py", ".yaml", ".md", ".csv", ".toml")
# design notes that once lived outside the repository; spelled in parts so that this file does not match itself
OUTSIDE = ("METHODS", "APT_GOA", "ENVIRONMENT", "DESIGN", "SURGEON_PAPER", "LANDSCAPE")
OUTSIDE_RE = re.compile(r"\b(" + "|".join(OUTSIDE) + r")" + re.escape(".md"))

SECTION = r"§\d+(?:\.\d+)*"
# a page name, optionally followed by the ](...) of a markdown link, then one or more chained sections:
# "docs/methods.md §1.1, §3.2 and §12", "[architecture.md §1.1](architecture.md)", "[x.md](x.md) §1 and §2"
CITATION_RE = re.compile(r"(?:(?P<prefix>docs/)|(?<![\w/.-]))(?P<page>[\w-]+\.md)(?:\]\([^)\s]*\))?"
                         rf"(?P<sections>(?:(?:\s*,\s*|\s+and\s+|\s+)(?:{SECTION}))+)")
# the quoted name some citations add: docs/architecture.md §1, "Masks"
QUOTED_RE = re.compile(rf"docs/(?P<page>[\w-]+\.md)(?:(?:\s*,\s*|\s+){SECTION})*,?\s+\"(?P<name>[^\"]+)\"")
LINK_RE = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def repository_files() -> list[Path]:
    """Tracked files and new files git does not ignore (so a file counts before it is committed)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    files = [ROOT / line for line in out.splitlines() if line.endswith(SUFFIXES)]
    # this file plants broken citations on purpose (test_the_checks_catch_what_they_are_for)
    return [f for f in files if f.is_file() and f.resolve() != Path(__file__).resolve()]


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def outside_references(text: str) -> list[str]:
    return [m.group(0) for m in OUTSIDE_RE.finditer(text)]


def headings(text: str) -> list[str]:
    """Markdown headings, outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6}\s", line):
            out.append(line)
    return out


def has_section(text: str, section: str) -> bool:
    """Whether a heading carries ``section`` (``§3.2``) as a whole number (``§3`` does not match ``§3.2``)."""
    pattern = re.compile(re.escape(section) + r"(?![\d]|\.\d)")
    return any(pattern.search(h) for h in headings(text))


def citations(text: str, in_docs: bool) -> list[tuple[str, str]]:
    """``(page, section)`` of every citation: ``docs/<page>.md §N`` anywhere; inside docs/ also ``<page>.md §N``."""
    out = []
    for m in CITATION_RE.finditer(text):
        if not (m.group("prefix") or in_docs):
            continue
        for section in re.findall(SECTION, m.group("sections")):
            out.append((m.group("page"), section))
    return out


def broken_citations(text: str, in_docs: bool, pages: dict[str, str]) -> list[str]:
    """Citations whose page does not exist or has no heading with that section number."""
    bad = []
    for page, section in citations(text, in_docs):
        if page not in pages:
            if in_docs and page == "README.md":
                continue
            bad.append(f"{page} {section}: no such page in docs/")
        elif not has_section(pages[page], section):
            bad.append(f"{page} {section}: no heading with {section}")
    for m in QUOTED_RE.finditer(text):
        page = m.group("page")
        if page in pages and m.group("name").lower() not in pages[page].lower():
            bad.append(f"{page} \"{m.group('name')}\": not in that page")
    return bad


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links (outside fenced code) whose target file does not exist."""
    bad, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in LINK_RE.finditer(line):
            target = m.group("target")
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s):, mailto:, an anchor in the same page
            if not (path.parent / target.split("#", 1)[0]).exists():
                bad.append(f"{path.relative_to(ROOT)}: link to {target}")
    return bad


def test_no_reference_to_documents_outside_the_repository():
    bad = {}
    for path in repository_files():
        found = outside_references(path.read_text(encoding="utf-8", errors="replace"))
        if found:
            bad[str(path.relative_to(ROOT))] = sorted(set(found))
    assert not bad, f"references to documents outside the repository (cite docs/ instead): {bad}"


def test_every_section_citation_resolves():
    pages = {p.name: p.read_text(encoding="utf-8") for p in doc_pages()}
    assert {"README.md", "methods.md", "architecture.md", "evaluation.md"} <= set(pages)
    bad, count = [], 0
    for path in repository_files() + [p for p in doc_pages() if p not in repository_files()]:
        text = path.read_text(encoding="utf-8", errors="replace")
        in_docs = path.parent == DOCS
        count += len(citations(text, in_docs))
        bad += [f"{path.relative_to(ROOT)}: {b}" for b in broken_citations(text, in_docs, pages)]
    assert count > 50, "the citation scan found almost nothing: is CITATION_RE still right?"
    assert not bad, "\n".join(bad)


def test_relative_links_in_readme_and_docs_point_at_files():
    bad = []
    for path in [ROOT / "README.md", *doc_pages()]:
        bad += broken_links(path, path.read_text(encoding="utf-8"))
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_are_for():
    """The checkers themselves: each flags a planted mistake and accepts the correct form."""
    pages = {"methods.md": "# T\n## §3 Baselines\n### §3.2 Wanda\n**Numerics**\n## §12 Pitfalls\n"}
    assert not broken_citations('see docs/methods.md §3.2, §12 "Numerics" and §3', False, pages)
    assert broken_citations("docs/methods.md §3.4", False, pages) == ["methods.md §3.4: no heading with §3.4"]
    assert broken_citations("docs/methods.md §1", False, pages)  # §1 is not §12's prefix
    assert broken_citations("docs/methods.md §3.2 and §9", False, pages) == ["methods.md §9: no heading with §9"]
    assert broken_citations("docs/missing.md §1", False, pages)
    assert broken_citations('docs/methods.md §12, "Masks"', False, pages)
    assert broken_citations("[methods.md §3.3](methods.md)", True, pages)
    assert not broken_citations("methods.md §3.3 outside docs/ is not a citation", False, pages)
    assert outside_references("as " + OUTSIDE[0] + ".md says") and not outside_references("docs/methods.md")
    assert broken_links(DOCS / "README.md", "[x](no-such-file.md) [y](methods.md) [z](https://a.b/c.md)") == \
        ["docs/README.md: link to no-such-file.md"]
