"""No host read of a device tensor in an overlapped forward: the CPU twin of tests/test_cuda.py's
`torch.cuda.set_sync_debug_mode("error")` test, over real gloo ranks.

What is watched, and what is allowed (docs/gpu.md, "Host syncs"):

- **Watched**: everything an overlapped forward runs for a layer: every plan node of the planned
  executor (route, dispatch_setup, dispatch_teardown, experts, combine_setup, shared,
  combine_teardown: the layer's code, the ops' setups and teardowns on the caller's side, on
  whatever thread the plan runs them), and, under `overlap.wrap(..., executor="fibers")`, each
  fiber's whole call of the module (the layer, the inline exchange, the fiber executor's op hook).
  Under `staging.simulate_device()` the cpu tensors take the device path, so a host read there
  (`.item()`, `.tolist()`, `int(t)`, `bool(t)`, `.cpu()`, `nonzero`, `repeat_interleave` without
  an output size, boolean-mask indexing, ...; `tests/test_staging.HostReads`) is one that would
  wait for the device on a GPU.
- **Attributed**: a read made inside `overlap/ops/` is the ops' own: it must happen inside an op
  call and be one of `ALLOWED_OPS_READS`, reads of exchange metadata the ops made on the host
  (the ticket in `comm_cmd_info`, the counts received over the carrier). Every other read (the
  layer, the executors, the pipeline, or an op reading a device value) fails the test.
- **The transformers integration**: every node of its EP calls' plans, transformers' own
  `"grouped_mm"` experts included (their `histc` over an explicit range does not synchronise).
- **Allowed** (not watched): the transport's own thread, which moves the bytes of the portable
  carriers (gloo, staged) and must know the sizes on the host: it resolves a setup's deferred
  sizes and checks after the setup's ready event, off the caller's thread; and the one agreement
  on the group's largest batch before the plan (`policy.agree`: an all-reduce of a host integer,
  on a cpu tensor over gloo). Neither holds the thread that issues the forward's kernels.
"""

from __future__ import annotations

import os
import threading
import traceback

import pytest
import torch
import torch.distributed as dist

import overlap

from .test_staging import HostReads, _DispatchReads, _FunctionReads


class _Log:
    """Host reads seen, each with where it came from: `ops` (inside overlap/ops: the four ops'
    own code) or `layer` (anything else: the layer, the executors, the pipeline)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ops: list[str] = []
        self.lock = threading.Lock()
        self.watched = 0

    def add(self, where: str, reads: list[tuple[str, str]]) -> None:
        with self.lock:
            self.watched += 1
            for read, origin in reads:
                if origin.startswith("transformers/") and read == "histc":
                    continue  # transformers' grouped_mm experts: histc over an explicit range, no sync
                (self.ops if origin.startswith("ops/") else self.lines).append(f"{where}: {read} ({origin})")


def _origin() -> str:
    """The innermost frame of the overlap package (not the tests), or of transformers' own code,
    that led to the read: `ops/portable.py:dispatch_teardown`, `transformers/...:<function>`."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace(os.sep, "/")
        if "/site-packages/transformers/" in path:
            return f"transformers/{path.rsplit('/site-packages/transformers/', 1)[1]}:{frame.name}"
        if "/overlap/" in path and "/tests/" not in path:
            return f"{path.rsplit('/overlap/', 1)[1]}:{frame.name}"
    return "?"


class _Attributed(list):
    """A read log that notes, at each read, where it came from (`_origin`)."""

    def append(self, read: str) -> None:
        super().append((read, _origin()))


class _Reads(HostReads):
    """`HostReads` whose log holds `(read, origin)` pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.log = _Attributed()  # type: ignore[assignment]
        self._modes = (_FunctionReads(self.log), _DispatchReads(self.log))


def _watching_plan_nodes(log: _Log):
    """Patch the planned executor so that every node body runs under `HostReads` (its thread)."""
    from overlap.pipeline import planned

    real = planned._in_caller_context

    def watched(fn, label):
        name = f"{getattr(fn, '__name__', '?')}@{label}"

        def body(inputs):
            with _Reads() as reads:
                try:
                    return fn(inputs)
                finally:
                    log.add(name, reads.log)

        return real(body, label)

    planned._in_caller_context = watched
    return lambda: setattr(planned, "_in_caller_context", real)


class _Watched(torch.nn.Module):
    """`inner(x)` under `HostReads` on the calling thread (a fiber)."""

    def __init__(self, inner: torch.nn.Module, log: _Log) -> None:
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _Reads() as reads:
            try:
                return self.inner(x)
            finally:
                self.log.add("fiber", reads.log)


def _forward_case(microbatches: int, quant: int, executor: str, experts_implementation: str = "auto") -> dict:
    from overlap.numerics import compare
    from overlap.ops import staging

    rank = dist.get_rank()
    layer = overlap.MoELayer(
        1024, 4, 2, 256, num_shared_experts=1, quant_mode=quant, seed=5, experts_implementation=experts_implementation
    )
    x = torch.randn(160, 1024, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    log = _Log()
    with staging.simulate_device():
        with overlap.scheduler(microbatches=microbatches):
            layer(x)  # warm up, unwatched
        if executor == "planned":
            undo = _watching_plan_nodes(log)
            try:
                with overlap.scheduler(microbatches=microbatches) as s:
                    out = layer(x)
            finally:
                undo()
            count = len(s.plan.steps)
        else:
            with overlap.scheduler(microbatches=microbatches) as s:
                out = overlap.wrap(_Watched(layer, log), executor="fibers")(x)
            count = len(s.recording.entries)
    dense = layer.dense_forward(x, dtype=torch.float32)
    return {
        "reads": log.lines,
        "ops_reads": log.ops,
        "watched": log.watched,
        "count": count,
        "vs_dense": compare(out, dense),
    }


OP_NODES = ("dispatch_setup", "dispatch_teardown", "combine_setup", "combine_teardown")
# The ops' allowed reads, all of exchange metadata made on the host: the ticket in comm_cmd_info (a
# host tensor the setup wrote), and the per-peer counts dispatch_teardown received over the
# carrier (their total; the block order built from them, then copied to the device non-blocking).
ALLOWED_OPS_READS = {
    ("ops/transport.py:read_ticket", "tolist"),
    ("ops/portable.py:dispatch_teardown", "__int__"),
    ("ops/portable.py:dispatch_teardown", "_local_scalar_dense"),
    ("ops/portable.py:dispatch_teardown", "repeat_interleave(tensor)"),
}


def _check(rank: int, res: dict) -> None:
    assert res["reads"] == [], f"rank {rank}: host reads in an overlapped forward: {res['reads']}"
    for line in res["ops_reads"]:  # "<node>: <read> (<origin>)"
        node, rest = line.split(": ", 1)
        read, origin = rest[:-1].split(" (")
        assert node.split("@")[0] in OP_NODES or node == "fiber", line
        assert (origin, read) in ALLOWED_OPS_READS, f"rank {rank}: the ops read a device value: {line}"
    if "vs_dense" in res:
        assert res["vs_dense"].ok, str(res["vs_dense"])


@pytest.mark.parametrize("quant", [0, 2], ids=["bf16", "int8"])
@pytest.mark.parametrize("microbatches", [1, 2, 4])
def test_planned_forward_reads_no_device_value_on_the_host(rank_pools, microbatches, quant):
    for rank, res in enumerate(rank_pools(2).run(_forward_case, microbatches, quant, "planned")):
        assert res["watched"] == res["count"] == 7 * microbatches, res  # every node of the plan was watched
        _check(rank, res)


@pytest.mark.parametrize("quant", [0, 2], ids=["bf16", "int8"])
@pytest.mark.parametrize("microbatches", [1, 2, 4])
def test_fiber_forward_reads_no_device_value_on_the_host(rank_pools, microbatches, quant):
    for rank, res in enumerate(rank_pools(2).run(_forward_case, microbatches, quant, "fibers")):
        assert res["watched"] == microbatches, res  # every fiber was watched
        _check(rank, res)


def test_the_watch_sees_the_expert_loop_read_its_counts(rank_pools):
    """The positive control: the per-expert loop (torch without grouped_mm) reads the counts on the
    host, in the experts node of every microbatch, and the watch reports exactly that."""
    for res in rank_pools(2).run(_forward_case, 2, 0, "planned", "loop"):
        reads = [r.split(" (")[0] for r in res["reads"]]
        assert reads == ["experts@mb0.l0: tolist", "experts@mb1.l0: tolist"], res["reads"]
        assert all("moe.py" in r for r in res["reads"]), res["reads"]


def _transformers_case(path: str) -> dict:
    """An overlapped forward of a tiny transformers model (`ep_implementation="overlap"`, the
    default `"grouped_mm"` experts) with every node of its EP calls' plans watched."""
    from overlap.integrations.tiny_models import load_expert_parallel
    from overlap.ops import staging

    model = load_expert_parallel(path, "overlap")
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(dist.get_rank()))
    log = _Log()
    with torch.no_grad(), staging.simulate_device():
        expected = model(ids).logits  # warm up, unwatched
        undo = _watching_plan_nodes(log)
        try:
            got = model(ids).logits
        finally:
            undo()
    return {
        "reads": log.lines,
        "ops_reads": log.ops,
        "watched": log.watched,
        "equal": torch.equal(got, expected),
        "experts": model.config._experts_implementation,
    }


def test_transformers_ep_call_reads_no_device_value_on_the_host(rank_pools, tmp_path):
    pytest.importorskip("transformers")
    from overlap.integrations.tiny_models import family_config, save_random_model

    path = save_random_model(family_config("qwen3_moe", experts=4, vocab_size=256), str(tmp_path / "qwen3"))
    for rank, res in enumerate(rank_pools(2).run(_transformers_case, path, timeout_s=300)):
        assert res["experts"] == "grouped_mm"
        assert res["watched"] >= 7 * 2, res  # one layer, 80 tokens: two microbatches, every node watched
        _check(rank, res)
        assert res["equal"], f"rank {rank}: the watched forward differs from the unwatched one"
