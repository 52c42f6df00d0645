"""Mutation check of the test suite: inject known bugs into a copy of the repository, run the test
files *of the bug's own module* that should notice, and print caught / missed per bug, with the test
that caught it. Run by hand:

    python bench/mutants.py [--only NAME ...] [--module MODULE ...] [--baseline] [--keep] [--list]

Two kinds of mutant, both found *by name* in the copy's source (a name that is not defined exactly
once at module level, or an edit whose text is not found exactly once inside that definition, fails
the run loudly):

- `edit(name, module, target, old, new, tests)`: replace the text `old` by `new` inside the
  definition of `target` (a function, or `Class.method`). Adding one is a three-line entry, e.g.::

      edit("header check ignores the op", "transport", "check_headers",
           "int(theirs[_H_OP]) != int(mine[_H_OP]) or ", "", (("tests/test_header_check.py", None),)),

- `Mutant(name, module, target, wrapper, tests)`: wrap the target (the wrapper is appended to the
  defining module; `_mutant_original` is the original), which survives refactors inside it.

The copy holds the working tree's tracked and untracked files (not ignored ones), with `kernels/`
also placed at `overlap/kernels/` so that `PYTHONPATH=<copy>` imports every module from the copy,
never from the editable install (checked before any test runs). Each mutant runs only the test files
(and `-k` selections) of its own module, with `-x`: the first failing test is the one reported.

Bugs: issue 16's five (combine weights only k = 0; two rows swapped in the block transpose; a setup
that waits for its transfer; tokens reversed within each (expert, source rank) block; an
`EmulatedLink.duration` that ignores the bandwidth), issue 23's audit (the shared-rank bound
`(W + 1) // 2`; the header check ignoring the exchange number; comm busy summing overlapping
transfers; the combine's shared rows at block-relative offsets; the microbatch rule rounding
`T / min_tokens` up; int8 rounding half away from zero), and one or more per layer: kernels,
params, pipeline policy, graph passes, timeline and report, the transformers integration, the CLI;
and for the CPU overlap work: a window teardown that does not sleep out the modelled link time,
packed CPU experts that leave the padding rows unset.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

Tests = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # the layer whose own tests must catch it
    target: str  # "function_name" or "ClassName.method"
    wrapper: str  # appended to the defining module; `_mutant_original` is the original callable
    tests: Tests  # (test file, -k expression) of the module's own tests
    where: str = ""  # when several modules define the target: the one whose path contains this
    edit: tuple[str, str] | None = None  # (old, new) text replaced inside the target's definition


def edit(name: str, module: str, target: str, old: str, new: str, tests: Tests, where: str = "") -> Mutant:
    """A mutant that replaces `old` by `new` (exactly one occurrence) inside `target`'s definition."""
    return Mutant(name, module, target, "", tests, where, (old, new))


WRAP_FUNCTION = """

# ---- injected by bench/mutants.py ({name}) ----
_mutant_original = {func}
{body}
"""

KERNEL_PROPS = "tests/test_kernels_properties.py"

MUTANTS = [
    # ---- kernels -------------------------------------------------------------------------------
    Mutant(
        "combine weights only k=0",
        "kernels",
        "weighted_combine",
        """
def weighted_combine(rows, positions, weights, *args, **kwargs):
    only_first = weights.clone()
    only_first[:, 1:] = 1.0  # k > 0 unweighted
    return _mutant_original(rows, positions, only_first, *args, **kwargs)
""",
        ((KERNEL_PROPS, "naive_loop or several_cache_blocks"),),
        "kernels/combine.py",
    ),
    Mutant(
        "swapped rows in the block transpose",
        "kernels",
        "block_transpose_index",
        """
def block_transpose_index(counts, **kwargs):
    index = _mutant_original(counts, **kwargs).clone()
    if index.numel() >= 2:
        index[[0, 1]] = index[[1, 0]].clone()
    return index
""",
        ((KERNEL_PROPS, "block_transpose"),),
    ),
    Mutant(
        "combine adds the shared rows at block-relative offsets (audit)",
        "kernels",
        "weighted_combine",
        """
import torch as _mutant_torch


def weighted_combine(rows, positions, weights, *, shared_positions=None, extra=None, out):
    if shared_positions is not None and out.shape[0] > 0:
        n, hidden = out.shape
        block = max(1, min(n, CACHE_ELEMENTS // ((positions.shape[1] + shared_positions.shape[0] + 1) * hidden)))
        relative = _mutant_torch.arange(n, device=shared_positions.device) % block
        shared_positions = shared_positions[:, relative]  # every block reads the first block's shared rows
    return _mutant_original(rows, positions, weights, shared_positions=shared_positions, extra=extra, out=out)
""",
        ((KERNEL_PROPS, "shared_experts_across or multi_block"),),
        "kernels/combine.py",
    ),
    Mutant(
        "int8 rounds half away from zero (audit)",
        "kernels",
        "quantize_rows",
        """
def quantize_rows(rows, smooth=None):
    q, scale = _mutant_original(rows, smooth)
    xf = rows.float() if smooth is None else rows.float() * smooth
    amax = xf.abs().amax(dim=-1)
    d = (amax * 0 + 127.0).div(amax.masked_fill(amax == 0, 1.0)).masked_fill(amax == 0, 1.0)
    v = xf * d.unsqueeze(-1)
    return (v.sign() * (v.abs() + 0.5).floor()).clamp(-128, 127).to(q.dtype), scale
""",
        (("tests/test_kernels_quant.py", None), (KERNEL_PROPS, "quantize")),
        "kernels/quant.py",
    ),
    edit(
        "expand_idx counts from 1",
        "kernels",
        "expand_idx_from_ids",
        "expand_idx[order] = slot_sorted",
        "expand_idx[order] = slot_sorted + 1",
        ((KERNEL_PROPS, "expand_idx"),),
        "kernels/layout.py",
    ),
    edit(
        "gather_rows into a column slice drops the rows",
        "kernels",
        "gather_rows",
        "out.copy_(src.index_select(0, index))",
        "out = src.index_select(0, index)",
        ((KERNEL_PROPS, "permute"),),
        "kernels/permute.py",
    ),
    # ---- params --------------------------------------------------------------------------------
    edit(
        "shared_expert_rank_num bound (W + 1) // 2 (audit)",
        "params",
        "MoeCommParams.__post_init__",
        "s_r, 0, world // 2,",
        "s_r, 0, (world + 1) // 2,",
        (("tests/test_boundaries.py", None),),
    ),
    edit(
        "H upper bound exclusive",
        "params",
        "MoeCommParams.check_batch",
        "hidden, MIN_HIDDEN, MAX_HIDDEN)",
        "hidden, MIN_HIDDEN, MAX_HIDDEN - 1)",
        (("tests/test_boundaries.py", None),),
    ),
    edit(
        "global_bs upper bound unchecked",
        "params",
        "MoeCommParams.check_batch",
        "<= self.global_bs <= MAX_BATCH * world",
        "<= self.global_bs",
        (("tests/test_boundaries.py", None),),
    ),
    # ---- pipeline policy -----------------------------------------------------------------------
    edit(
        "microbatch rule rounds T / min_tokens up (audit)",
        "pipeline policy",
        "split",
        "total // min_tokens if min_tokens > 0",
        "-(-total // min_tokens) if min_tokens > 0",
        (("tests/test_policy.py", None),),
        "pipeline/policy.py",
    ),
    # ---- graph passes --------------------------------------------------------------------------
    Mutant(
        "events on every cross-stream edge (no transitive reduction)",
        "graph",
        "_implied_edges",
        """
def _implied_edges(g):
    return set()
""",
        (("tests/test_graph.py", "event or transitive"),),
    ),
    Mutant(
        "check_same_order accepts plans that differ",
        "graph",
        "check_same_order",
        """
def check_same_order(plans):
    return None
""",
        (("tests/test_graph.py", "same_order"),),
    ),
    # ---- timeline and report -------------------------------------------------------------------
    edit(
        "comm busy sums overlapping transfers (audit)",
        "timeline",
        "Timeline.report",
        "total(compute), total(comm_union)",
        "total(compute), sum(end - start for start, end in comm)",
        (("tests/test_report_arithmetic.py", None),),
    ),
    edit(
        "serial estimate counts the waits twice",
        "timeline",
        "Timeline.report",
        "serial -= sum(",
        "serial -= 0 * sum(",
        (("tests/test_report_arithmetic.py", None),),
    ),
    # ---- transformers integration --------------------------------------------------------------
    edit(
        "transformers splits from 32 tokens per rank, not 64",
        "transformers",
        "num_microbatches",
        "MIN_SPLIT_TOKENS // 2",
        "MIN_SPLIT_TOKENS // 4",
        (("tests/test_integration_transformers.py", "microbatch_rule"),),
    ),
    edit(
        "transformers accepts microbatches(0)",
        "transformers",
        "microbatches",
        "num < 1",
        "num < 0",
        (("tests/test_integration_transformers.py", "microbatches_refuses"),),
        "integrations/transformers.py",
    ),
    # ---- CLI checks ----------------------------------------------------------------------------
    edit(
        "CLI accepts --tokens 0",
        "CLI",
        "check_args",
        '_in("--tokens", shape.tokens)',
        '_in("--tokens", shape.tokens + 1)',
        (("tests/test_main.py", "bad_arguments"),),
    ),
    edit(
        "CLI accepts --shared 5",
        "CLI",
        "check_args",
        '_in("--shared", shape.shared)',
        '_in("--shared", shape.shared - 1)',
        (("tests/test_main.py", "bad_arguments"),),
    ),
    # ---- transport protocol and carriers (the integrator adds more here after the restructure) --
    edit(
        "header check ignores the exchange number (audit)",
        "transport",
        "check_headers",
        " or int(theirs[_H_SEQ]) != int(mine[_H_SEQ])",
        "",
        (("tests/test_header_check.py", None),),
    ),
    # the window carrier (overlap/ops/window.py)
    edit(
        "window overwrites a slot its reader has not released",
        "transport",
        "WindowLane._write",
        "if previous and released < previous:",
        "if False:",
        (("tests/test_window.py", "slots_are_reused"),),
    ),
    edit(
        "window takes any written counter as this exchange's",
        "transport",
        "WindowLane._landed",
        "int(w[lay.counter(r, slot)]) == ident",
        "int(w[lay.counter(r, slot)]) > 0",
        (("tests/test_window.py", None),),
    ),
    edit(
        "window misses a dead peer that is an unreaped zombie",
        "transport",
        "_process_gone",
        'return state in (b"Z", b"X")',
        "return False",
        (("tests/test_window.py", "dead_peer"),),
    ),
    edit(
        "window teardown returns before the modelled link time",
        "transport",
        "Transfer.wait",
        "time.sleep(delay)",
        "pass",
        (("tests/test_link.py", "without_a_thread"),),
    ),
    # ---- the reference layer's experts (overlap/moe.py) -----------------------------------------
    edit(
        "packed experts leave the rows past the counts unset",
        "layer",
        "packed_gated_mlp",
        "out[start:].zero_()",
        "pass",
        (("tests/test_moe.py", "packed"),),
    ),
    Mutant(
        "EmulatedLink.duration ignores bandwidth",
        "transport",
        "EmulatedLink.duration",
        """
def _mutant_duration(self, nbytes):
    return self.latency_s


EmulatedLink.duration = _mutant_duration
""",
        (("tests/test_link.py", None),),
    ),
    # ---- the ops -------------------------------------------------------------------------------
    Mutant(
        "setup waits for its transfer",
        "ops",
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
        (("tests/test_ops.py", "setup_returns or awaitable"),),
        "portable",
    ),
    Mutant(
        "tokens reversed within each (expert, source rank) block",
        "ops",
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
        (("tests/test_layout_ops.py", None),),  # the round trip is unchanged: only the layout shows it
        "portable",
    ),
    edit(
        "gloo posts every op of an exchange as one batch",
        "transport",
        "P2PLane.__init__",
        'self.posts_each = dist.get_backend(group) == "gloo"',
        "self.posts_each = False",
        (("tests/test_reliability.py", "survivor_that_sets_up"),),
    ),
    edit(
        "gloo waits on an exchange's ops one after another, in post order",
        "transport",
        "P2PLane._p2p",
        "        if self.posts_each:\n            failures = self._wait_all(works, deadline, landed)",
        "        if False:\n            failures = self._wait_all(works, deadline, landed)",
        (("tests/test_reliability.py", "named_at_once_while_another_peer_is_silent"),),
    ),
    edit(
        "the emulated link on a device stream sleeps the host instead",
        "transport",
        "Lane.hold_on_link",
        "        if stream is not None:\n            transfer.done_event = staging.hold_stream(stream, delay)",
        "        if False:\n            transfer.done_event = staging.hold_stream(stream, delay)",
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


def _definition_node(tree: ast.Module, target: str) -> ast.FunctionDef | None:
    cls, _, name = target.rpartition(".")
    body = tree.body
    if cls:
        owner = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        body = owner.body if owner is not None else []
    return next((n for n in body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def find_definition(root: Path, target: str, where: str = "") -> Path:
    """The one module under overlap/ that defines `target` at module level (of those, the ones whose
    path contains `where` when there are several); fail loudly unless exactly one is left."""
    hits = [p for p in sorted((root / "overlap").rglob("*.py")) if _definition_node(ast.parse(p.read_text()), target)]
    if len(hits) > 1 and where:
        hits = [h for h in hits if where in str(h.relative_to(root))]
    if len(hits) != 1:
        raise SystemExit(f"mutant target {target!r} must be defined exactly once under overlap/, found {hits}")
    return hits[0]


def inject(root: Path, mutant: Mutant) -> Path:
    path = find_definition(root, mutant.target, mutant.where)
    source = path.read_text()
    if mutant.edit is not None:
        old, new = mutant.edit
        node = _definition_node(ast.parse(source), mutant.target)
        assert node is not None and node.end_lineno is not None
        lines = source.splitlines(keepends=True)
        first = node.lineno - 1 - len(node.decorator_list)
        head, body, tail = (
            "".join(lines[:first]),
            "".join(lines[first : node.end_lineno]),
            "".join(lines[node.end_lineno :]),
        )
        if body.count(old) != 1:
            raise SystemExit(
                f"mutant {mutant.name!r}: {old!r} occurs {body.count(old)} times in {mutant.target} ({path}), not once"
            )
        path.write_text(head + body.replace(old, new) + tail)
    else:
        if "." in mutant.target:
            body = mutant.wrapper
        else:
            body = WRAP_FUNCTION.format(name=mutant.name, func=mutant.target, body=mutant.wrapper)
        path.write_text(source + "\n" + body)
    # Fail loudly if the module no longer parses (the mutation must apply cleanly).
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


FAILED_TEST = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$")  # the test id may hold spaces


def run_tests(root: Path, tests: Tests, timeout_s: float) -> list[tuple[str, bool, str, str, float]]:
    """Per test file: (label, failed, the first failing test's id or "", detail, seconds)."""
    results = []
    for test_file, expr in tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", test_file]
        if expr:
            cmd += ["-k", expr]
        t0 = time.perf_counter()
        try:
            out = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=timeout_s)
            code, stdout, stderr = out.returncode, out.stdout, out.stderr
        except subprocess.TimeoutExpired as exc:
            code, stdout, stderr = -1, str(exc.stdout or ""), f"timed out after {timeout_s:.0f} s"
        seconds = time.perf_counter() - t0
        lines = stdout.strip().splitlines()
        failed = [ln for ln in lines if FAILED_TEST.match(ln)]
        test_id = FAILED_TEST.match(failed[0])[1] if failed else ""  # type: ignore[index]
        summary = failed[0] if failed else (lines[-1] if lines else stderr[-300:])
        if code == 5:  # no test selected: a mutant whose -k matches nothing must not count as caught
            summary = f"no test selected: {summary}"
        label = test_file + (f" -k '{expr}'" if expr else "")
        results.append((label, code not in (0, 5) and code != -1 or bool(failed), test_id, summary, seconds))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="substrings of mutant names to run")
    ap.add_argument("--module", nargs="*", help="run the mutants of these modules (kernels, params, ...)")
    ap.add_argument("--baseline", action="store_true", help="also run every listed test file unmutated")
    ap.add_argument("--keep", action="store_true", help="keep the copies (their paths are printed)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test file run (default 900)")
    args = ap.parse_args()
    mutants = [
        m
        for m in MUTANTS
        if (not args.only or any(s in m.name for s in args.only)) and (not args.module or m.module in args.module)
    ]
    if args.list:
        for m in MUTANTS:
            print(f"{m.module:<16} {m.name:<66} {', '.join(t + (f' -k {k!r}' if k else '') for t, k in m.tests)}")
        return
    if not mutants:
        raise SystemExit(f"--only/--module matched none of {[(m.module, m.name) for m in MUTANTS]}")
    runs: list[Mutant] = list(mutants)
    if args.baseline:
        all_tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        runs.insert(0, Mutant("baseline (no mutation)", "-", "", "", all_tests))
    summary = []
    for mutant in runs:
        baseline = mutant.module == "-"
        root = Path(tempfile.mkdtemp(prefix="overlap-mutant-"))
        try:
            copy_tree(root)
            where = "" if baseline else f" into {inject(root, mutant).relative_to(root)}"
            check_imports_from(root)
            print(f"\n== [{mutant.module}] {mutant.name}{where}", flush=True)
            results = run_tests(root, mutant.tests, args.timeout)
            for label, failed, _, detail, seconds in results:
                verdict = ("FAILED" if failed else "passed") if baseline else ("caught" if failed else "missed")
                print(f"   {verdict:<7} {label:<60} {seconds:6.0f} s  {detail}", flush=True)
            by = next((test_id or label for label, failed, test_id, _, _ in results if failed), "")
            summary.append((mutant, by, sum(r[4] for r in results)))
        finally:
            if args.keep:
                print(f"   copy kept at {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    print("\nsummary (each mutant run against its own module's tests; 'caught by' is the first failing test)")
    print(f"  {'verdict':<8} {'module':<16} {'mutant':<66} {'s':>5}  caught by")
    for mutant, by, seconds in summary:
        if mutant.module == "-":
            verdict = "FAILED (the suite must pass unmutated)" if by else "passed"
        else:
            verdict = "caught" if by else "MISSED"
        print(f"  {verdict:<8} {mutant.module:<16} {mutant.name:<66} {seconds:5.0f}  {by}")
    if any(
        bool(by) == (mutant.module == "-") for mutant, by, _ in summary
    ):  # a baseline failed or a mutant got through
        sys.exit(1)


if __name__ == "__main__":
    main()
