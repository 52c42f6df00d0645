"""The README as a newcomer runs it: every Python block runs as written (in a fresh folder, as its own
script: the multi-rank ones start their ranks with `overlap.launch.run_ranks`), every
`python -m overlap ...` command line it shows is accepted by the command line's checks, and every
block that does not run says why."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->")
LANGUAGES = {"python", "bash", "text"}


def blocks() -> list[dict]:
    """Fenced blocks in order: language, code, first line number, skip reason (or None)."""
    lines = README.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = lines[start - 1] if start > 0 else ""
        skip = SKIP.match(before)
        out.append(
            {
                "lang": m.group(1),
                "code": "\n".join(lines[start + 1 : end]) + "\n",
                "line": start + 1,
                "skip": skip.group(1) if skip else None,
            }
        )
        i = end + 1
    return out


RUNNABLE = [b for b in blocks() if b["lang"] == "python" and b["skip"] is None]


def test_every_block_is_marked():
    found = blocks()
    assert found, "no code blocks found in the README"
    for b in found:
        assert b["lang"] in LANGUAGES, f"README line {b['line']}: fence language {b['lang']!r} not in {LANGUAGES}"
    skipped = [b for b in found if b["skip"] is not None]
    assert all(b["lang"] == "python" for b in skipped)
    assert len(skipped) <= 2, "keep the README's blocks that don't run few"
    assert len(RUNNABLE) >= 2


def test_first_lines_are_the_fresh_machine_commands():
    first = blocks()[0]
    assert first["lang"] == "bash"
    commands = first["code"].splitlines()
    assert commands[0].endswith("python -m overlap demo")
    assert commands[1].endswith("python -m pytest -q")


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{b['line']}" for b in RUNNABLE])
def test_python_block_runs_as_written(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block["code"])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"README block at line {block['line']} failed:\n{proc.stdout}\n{proc.stderr}"


def _overlap_commands() -> list[list[str]]:
    commands = []
    for b in blocks():
        if b["lang"] != "bash":
            continue
        for line in b["code"].splitlines():
            if "python -m overlap " in line:
                commands.append(shlex.split(line.split("python -m overlap ", 1)[1]))
    return commands


def test_command_lines_are_accepted():
    """Each shown `python -m overlap` line parses and passes the checks made before ranks start."""
    from overlap.__main__ import checked, parser

    commands = _overlap_commands()
    assert any(c[0] == "bench" for c in commands) and any(c[0] == "demo" for c in commands)
    for argv in commands:
        checked(parser().parse_args(argv), argv)  # raises ValueError as the command line would refuse it
