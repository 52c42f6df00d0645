"""The docs stand alone: every bench is in the README, every relative link of README.md and
docs/*.md resolves (files, and `#anchors` to a heading of the file they point into), and no file
of the repository names a `.md` file or a repository path that is not in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"\b((?:bench|examples|tests|docs|overlap|kernels)/[A-Za-z0-9_/.-]+\.(?:py|sh|md|json|png))\b")
MD = re.compile(r"[A-Za-z0-9_./-]+\.md\b")


def _tracked() -> list[Path]:
    try:
        names = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every file
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return None


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            lines.append(line.lstrip("#"))
    return {_slug(h) for h in lines}


def test_every_bench_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    benches = sorted(p.name for p in (ROOT / "bench").iterdir() if p.suffix in (".py", ".sh"))
    assert benches
    missing = [name for name in benches if f"bench/{name}" not in readme]
    assert not missing, f"README.md does not mention {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_relative_links_resolve(doc):
    text = doc.read_text()
    links = [a or b for a, b in LINK.findall(text)]
    for link in links:
        if re.match(r"^[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.is_file(), f"{doc.name}: link {link!r} points to {path}, which is not a file"
        assert ROOT in path.parents, f"{doc.name}: link {link!r} leaves the repository"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: link {link!r}: no heading #{anchor} in {path.name}"


def test_no_file_names_a_missing_file():
    """A `.md` file or a path under bench/, examples/, tests/, docs/, overlap/, kernels/ named in
    any tracked file (code, docs, pyproject.toml) exists: relative to the root, to the naming file's
    folder, or (a bare doc name, as in the README's layout) to docs/."""
    missing = []
    for path in _tracked():
        text = _text(path)
        if text is None:
            continue
        for name in set(MD.findall(text)) | set(PATH.findall(text)):
            if "NAME" in name:  # a placeholder (`bench/NAME.py`)
                continue
            bases = (ROOT, path.parent, ROOT / "docs")
            if not any((base / name).exists() for base in bases):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "named but not in the repository:\n" + "\n".join(sorted(missing))


def test_docs_read_as_documentation():
    """No doc reads as a change note or points at a place outside the repository."""
    for doc in DOCS:
        text = doc.read_text()
        for phrase in ("to be merged", "what changed", "../shared", "DESIGN" + ".md"):
            assert phrase.lower() not in text.lower(), f"{doc.name} says {phrase!r}"
