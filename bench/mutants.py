"""Mutation check of the test suite: inject known bugs into a copy of the repository, run the test
files that should notice, and print caught / missed per bug. Run by hand:

    python bench/mutants.py [--only NAME ...] [--baseline] [--keep]

Each mutant wraps one function (or method) found *by name* in the copy's source, so it survives
refactors inside the function; a name that is not defined exactly once at module level fails the
run loudly. The copy holds the working tree's tracked and untracked files (not ignored ones), with
`kernels/` also placed at `overlap/kernels/` so that `PYTHONPATH=<copy>` imports every module
from the copy, never from the editable install (checked before any test runs).

Bugs (issue 16): combine weights only k = 0; two rows swapped in the block transpose; a setup that
waits for its transfer; tokens reversed within each (expert, source rank) block on dispatch and
restored on combine; an `EmulatedLink.duration` that ignores the bandwidth.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    target: str  # "function_name" or "ClassName.method"
    wrapper: str  # appended to the defining module; `_mutant_original` is the original callable
    tests: tuple[tuple[str, str | None], ...]  # (test file, -k expression)
    where: str = ""  # when several modules define the target: the one whose path contains this


WRAP_FUNCTION = """

# ---- injected by bench/mutants.py ({name}) ----
_mutant_original = {func}
{body}
"""

MUTANTS = [
    Mutant(
        "combine weights only k=0",
        "weighted_combine",
        """
def weighted_combine(rows, positions, weights, *args, **kwargs):
    only_first = weights.clone()
    only_first[:, 1:] = 1.0  # k > 0 unweighted
    return _mutant_original(rows, positions, only_first, *args, **kwargs)
""",
        (("tests/test_ops.py", None),),
        "kernels/combine.py",
    ),
    Mutant(
        "swapped rows in the block transpose",
        "block_transpose_index",
        """
def block_transpose_index(counts):
    index = _mutant_original(counts).clone()
    if index.numel() >= 2:
        index[[0, 1]] = index[[1, 0]].clone()
    return index
""",
        (("tests/test_layout_ops.py", None), ("tests/test_ops.py", None)),
    ),
    Mutant(
        "setup waits for its transfer",
        "dispatch_setup",
        """
def dispatch_setup(*args, **kwargs):
    from overlap.ops import transport as _transport
    result = _mutant_original(*args, **kwargs)
    handle = _transport.transfer_of(result[-1])
    if handle is not None:
        handle.wait()
    return result
""",
        (
            ("tests/test_ops.py", "setup_returns or awaitable"),
            ("tests/test_overlap_deterministic.py", None),
            ("tests/test_link.py", None),
        ),
        "portable",
    ),
    Mutant(
        "tokens reversed within each (expert, source rank) block",
        "dispatch_teardown",
        """
import inspect as _inspect


def _mutant_blocks(assist, local, world):
    cum = [0] + [int(v) for v in assist[: local * world].tolist()]
    return [(cum[i], cum[i + 1]) for i in range(local * world)]


def _mutant_local(bound):
    a = bound.arguments
    shared_ranks = a.get("shared_expert_rank_num", 0)
    if a["ep_rank_id"] < shared_ranks:
        return 1
    return a["moe_expert_num"] // (a["ep_world_size"] - shared_ranks)


def _mutant_reverse(rows, blocks):
    rows = rows.clone()
    for lo, hi in blocks:
        if hi - lo > 1:
            rows[lo:hi] = rows[lo:hi].flip(0).clone()
    return rows


def dispatch_teardown(*args, **kwargs):
    bound = _inspect.signature(_mutant_original).bind(*args, **kwargs)
    bound.apply_defaults()
    expand_x, scales, assist, nums = _mutant_original(*args, **kwargs)
    blocks = _mutant_blocks(assist, _mutant_local(bound), bound.arguments["ep_world_size"])
    return _mutant_reverse(expand_x, blocks), _mutant_reverse(scales, blocks), assist, nums


_mutant_combine_original = combine_setup


def combine_setup(*args, **kwargs):
    bound = _inspect.signature(_mutant_combine_original).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    blocks = _mutant_blocks(a["assist_info_for_combine"], _mutant_local(bound), a["ep_world_size"])
    a["expand_x"] = _mutant_reverse(a["expand_x"], blocks)  # restored: the round trip is unchanged
    return _mutant_combine_original(*bound.args, **bound.kwargs)
""",
        (("tests/test_layout_ops.py", None), ("tests/test_ops.py", None)),
        "portable",
    ),
    Mutant(
        "EmulatedLink.duration ignores bandwidth",
        "EmulatedLink.duration",
        """
def _mutant_duration(self, nbytes):
    return self.latency_s


EmulatedLink.duration = _mutant_duration
""",
        (("tests/test_link.py", None),),
    ),
]


def copy_tree(dest: Path) -> None:
    """Tracked and untracked (not ignored) files of the working tree; kernels/ also as overlap/kernels/."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if (dest / "kernels").is_dir() and not (dest / "overlap" / "kernels").exists():
        shutil.copytree(dest / "kernels", dest / "overlap" / "kernels")


def find_definition(root: Path, target: str, where: str = "") -> Path:
    """The one module under overlap/ that defines `target` at module level (of those, the ones whose
    path contains `where` when there are several); fail loudly unless exactly one is left."""
    cls, _, method = target.rpartition(".")
    hits = []
    for path in sorted((root / "overlap").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if cls and isinstance(node, ast.ClassDef) and node.name == cls:
                if any(isinstance(n, ast.FunctionDef) and n.name == method for n in node.body):
                    hits.append(path)
            elif not cls and isinstance(node, ast.FunctionDef) and node.name == method:
                hits.append(path)
    if len(hits) > 1 and where:
        hits = [h for h in hits if where in str(h.relative_to(root))]
    if len(hits) != 1:
        raise SystemExit(f"mutant target {target!r} must be defined exactly once under overlap/, found {hits}")
    return hits[0]


def inject(root: Path, mutant: Mutant) -> Path:
    path = find_definition(root, mutant.target, mutant.where)
    source = path.read_text()
    if "." in mutant.target:
        body = mutant.wrapper
    else:
        body = WRAP_FUNCTION.format(name=mutant.name, func=mutant.target, body=mutant.wrapper)
    path.write_text(source + "\n" + body)
    # Fail loudly if the module no longer imports (the wrapper must apply cleanly).
    check = subprocess.run(
        [sys.executable, "-c", f"import ast, sys; ast.parse(open({str(path)!r}).read())"],
        capture_output=True,
        text=True,
    )
    if check.returncode:
        raise SystemExit(f"mutant {mutant.name!r} broke {path}: {check.stderr}")
    return path


def env_for(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from(root: Path) -> None:
    code = (
        "import overlap, overlap.kernels, overlap.ops.transport as t; "
        "print(overlap.__file__, overlap.kernels.__file__, t.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env_for(root), capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode or len(paths) != 3 or not all(Path(p).resolve().is_relative_to(root.resolve()) for p in paths):
        raise SystemExit(f"the copy at {root} is not what Python imports: {out.stdout}{out.stderr}")


def run_tests(root: Path, tests: tuple[tuple[str, str | None], ...]) -> list[tuple[str, bool, str, float]]:
    """Per test file: (file, caught, first failure or summary, seconds)."""
    results = []
    for test_file, expr in tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file]
        if expr:
            cmd += ["-k", expr]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        lines = out.stdout.strip().splitlines()
        failed = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
        summary = failed[0] if failed else (lines[-1] if lines else out.stderr[-300:])
        label = test_file + (f" -k '{expr}'" if expr else "")
        results.append((label, out.returncode != 0, summary, seconds))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="substrings of mutant names to run")
    ap.add_argument("--baseline", action="store_true", help="also run every listed test file unmutated")
    ap.add_argument("--keep", action="store_true", help="keep the copies (their paths are printed)")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]
    if not mutants:
        raise SystemExit(f"--only matched none of {[m.name for m in MUTANTS]}")
    runs: list[tuple[str, Mutant | None]] = [(m.name, m) for m in mutants]
    if args.baseline:
        all_tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        runs.insert(0, ("baseline (no mutation)", Mutant("baseline", "", "", all_tests)))
    summary = []
    for name, mutant in runs:
        root = Path(tempfile.mkdtemp(prefix="overlap-mutant-"))
        try:
            copy_tree(root)
            where = "" if mutant.name == "baseline" else f" into {inject(root, mutant).relative_to(root)}"
            check_imports_from(root)
            print(f"\n== {name}{where}", flush=True)
            results = run_tests(root, mutant.tests)
            for label, caught, detail, seconds in results:
                verdict = (
                    ("FAILED" if caught else "passed")
                    if mutant.name == "baseline"
                    else ("caught" if caught else "missed")
                )
                print(f"   {verdict:<7} {label:<60} {seconds:6.0f} s  {detail}", flush=True)
            caught_any = any(c for _, c, _, _ in results)
            summary.append((name, caught_any, mutant.name == "baseline"))
        finally:
            if args.keep:
                print(f"   copy kept at {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    print("\nsummary")
    for name, caught, baseline in summary:
        verdict = (
            ("FAILED (the suite must pass unmutated)" if caught else "passed")
            if baseline
            else ("caught" if caught else "MISSED")
        )
        print(f"  {verdict:<8} {name}")
    if any(caught == baseline for _, caught, baseline in summary):  # a baseline failed or a mutant got through
        sys.exit(1)


if __name__ == "__main__":
    main()
