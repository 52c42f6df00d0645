"""`ep_implementation="overlap"` on real transformers MoE models over gloo ranks: Qwen3-MoE, Mixtral,
OLMoE, Qwen2-MoE, GPT-OSS and DeepSeek-V3, on 2 and 4 ranks, bf16 and fp16, forward and decode.

Models are tiny (hidden 1024, 1-2 layers, 4-512 experts, vocab 256), built from configs with fixed
seeds and random weights, saved once and loaded on every rank with
`from_pretrained(distributed_config=...)`, the path users take.

Two references:
- `"all_to_all"` on the same distributed model, required **bit-equal** wherever the computation is
  the same: one microbatch (`ohf.microbatches(1)`), so every expert GEMM sees the same rows as in
  `AllToAllEP`. The integration rounds each weighted expert output in the model's dtype before the
  combine adds the K of them, exactly as transformers does, so nothing else differs.
- the single-process model (ranks holding their own batches; with a TP group sharing the batch the
  attention itself is tensor parallel, so there "all_to_all" is the reference), checked **per token**:
  for every token, max over the vocabulary of |Δ logit| <= `tolerance(dtype, scale)`.

The tolerance, and how it was derived: a correct run that rounds differently (expert GEMMs that
round per row count, as on hosts with AMX when the batch is split into microbatches; or a combine
that adds the K products in fp32 without rounding each, which is what this integration did before)
moves the MoE output by about 1 ulp of the dtype. Measured on the GPT-OSS model of issue 15
(4 ranks, 64 tokens each, bf16), that moved the worst token's logits by 0.0156-0.0195 on logits of
magnitude 2.2-2.8, i.e. 1-1.25 ulp of the logits' largest magnitude (issue 16 quotes about 0.05,
3 ulp, for the older models). We allow `TOL_ULPS = 8` ulp of the largest reference logit in the
model's dtype (bf16: 8 bits of precision, fp16: 11): bf16 at |logit| ~ 3: 8 · 2^-6 = 0.125; fp16:
0.0156. A wrong row, weight or route moves a token by O(1) (the combine-weight bug: 0.39-0.85), so
it cannot hide under it. What no tolerance can absorb: a near-tied route that flips under a 1-ulp
difference changes that token by O(1); that is why the bit-equality above is checked first.

Ranks holding different batches use FSDP2 (`fsdp_size = ep_size`), which refuses
`torch.inference_mode` (its unshard touches version counters), so those runs use `torch.no_grad`.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed.expert_parallel import EPImplementationInterface

import overlap.integrations.transformers as ohf
from overlap.integrations.tiny_models import family_config, load_expert_parallel, save_random_model

TOL_ULPS = 8
VOCAB = 256
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """`TOL_ULPS` ulp of `scale` (the largest |reference logit|) in `dtype` (see the module docstring)."""
    return TOL_ULPS * 2.0 ** (math.floor(math.log2(scale)) - MANTISSA_BITS[dtype])


def qwen3_config(layers: int = 2, experts: int = 4, **kw):
    return family_config("qwen3_moe", layers=layers, experts=experts, vocab_size=VOCAB, **kw)


def mixtral_config(layers: int = 1, experts: int = 4, **kw):
    return family_config("mixtral", layers=layers, experts=experts, vocab_size=VOCAB, **kw)


def save_model(config, path: str, dtype: torch.dtype = torch.bfloat16) -> str:
    return save_random_model(config, path, dtype=dtype)


def _family_config(name: str):
    """One config per model family, 8 experts (2 local experts per rank on 4 ranks)."""
    return family_config(name, experts=8, vocab_size=VOCAB)


FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "qwen3": save_model(qwen3_config(), str(root / "qwen3")),
        "qwen3_1l": save_model(qwen3_config(layers=1), str(root / "qwen3_1l")),
        "qwen3_8e": save_model(qwen3_config(layers=1, experts=8), str(root / "qwen3_8e")),
        "mixtral": save_model(mixtral_config(), str(root / "mixtral")),
    }


# --------------------------------------------------------------------------------------------
# On the ranks
# --------------------------------------------------------------------------------------------


def _load(path: str, layout: str, impl: str, world: int, dtype: torch.dtype = torch.bfloat16):
    """layout: "dp" (each rank its own batch: fsdp = ep = world), "tp" (the group shares one
    batch: tp = ep = world), "mixed" (tp = 2 share a batch, ep = world over fsdp * tp)."""
    assert world == dist.get_world_size()
    return load_expert_parallel(path, impl, layout=layout, dtype=dtype)


def _prompt(layout: str, lengths: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    """This rank's input ids: its own length under "dp", the group's shared batch otherwise."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(0, VOCAB, (batch, n), generator=g) for n in lengths]
    if layout == "dp":
        return prompts[rank % len(prompts)]
    if layout == "mixed":
        return prompts[(rank // 2) % len(prompts)]
    return prompts[0]


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-token error of logits `(..., V)`: the worst token's max |Δ| and where it is, the
    reference's largest |logit|, whether the two are bit-equal, and the model's dtype (generate
    returns fp32 logits of a bf16 model)."""
    per_token = (a.float() - b.float()).abs().amax(-1).flatten()
    worst = int(per_token.argmax())
    return {
        "max": float(per_token[worst]),
        "token": worst,
        "scale": float(b.float().abs().max()),
        "equal": torch.equal(a, b),
        "dtype": next((t.dtype for t in (b, a) if t.dtype in MANTISSA_BITS), torch.bfloat16),
    }


def forward_case(
    path: str,
    layout: str,
    lengths: tuple[int, ...],
    batch: int = 1,
    forced: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    world = dist.get_world_size()
    ids = _prompt(layout, lengths, batch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ours = _load(path, layout, "overlap", world, dtype)
    theirs = _load(path, layout, "all_to_all", world, dtype)
    with torch.no_grad():
        expected = ref(ids).logits
        with ohf.record(ours) as rec, ohf.microbatches(forced):
            start = time.perf_counter()
            got = ours(ids).logits
            inside = time.perf_counter() - start
        with ohf.microbatches(1):
            one = ours(ids).logits
        a2a = theirs(ids).logits
    names = rec.timeline.order()
    return {
        "tokens": ids.numel(),
        "vs_ref": _diff(got, expected),
        "vs_a2a": _diff(got, a2a),
        "one_vs_a2a": _diff(one, a2a),
        "a2a_vs_ref": _diff(a2a, expected),
        "calls": rec.num_calls,
        "microbatches": sorted({n.split("@")[1].split(".")[0] for n in names}),
        "names": names,
        "report": rec.report(),
        "inside_s": inside,
        "plan": [str(step.node) for step in rec.scheduler.plan.steps],
    }


def _count_ep_tokens(calls: list[int]):
    """Patch `OverlapEP.__call__` on this rank to append each call's token count to `calls`."""
    original = ohf.OverlapEP.__call__

    def counting(self, hidden_states, top_k_index, top_k_weights):
        calls.append(int(hidden_states.shape[0]))
        return original(self, hidden_states, top_k_index, top_k_weights)

    ohf.OverlapEP.__call__ = counting
    return original


def generate_case(path: str, layout: str, lengths: tuple[int, ...], new_tokens: int = 4) -> dict:
    """Greedy decode with a KV cache through overlap; every step's logits against the single-process
    model run on the same (prompt + generated) sequence, so a rounding tie cannot make the check
    flaky; and the token counts of the EP calls (prefill: the prompt, then 1 per step: the cache)."""
    world = dist.get_world_size()
    ids = _prompt(layout, lengths)
    ours = _load(path, layout, "overlap", world)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    calls: list[int] = []
    original = _count_ep_tokens(calls)
    try:
        with torch.no_grad():
            with ohf.record(ours) as rec:
                out = ours.generate(
                    ids,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    use_cache=True,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
    finally:
        ohf.OverlapEP.__call__ = original
    with torch.no_grad():
        steps = torch.stack(out.logits, dim=1)  # (B, new_tokens, V)
        full = ref(out.sequences[:, :-1]).logits[:, ids.shape[1] - 1 :]
    return {
        "new": out.sequences.shape[1] - ids.shape[1],
        "vs_ref": _diff(steps, full),
        "calls": rec.num_calls,
        "ep_tokens": calls,
        "prompt": ids.shape[1],
        "layers": ours.config.num_hidden_layers,
    }


def two_batch_generate_case(path: str, new_tokens: int = 3, parts: int = 2) -> dict:
    """`ohf.generate`: the batch's sequences in parts, one fiber each, every part its own KV cache."""
    world = dist.get_world_size()
    ids = _prompt("dp", (12, 9), batch=2)
    ours = _load(path, "dp", "overlap", world)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = ours.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        with ohf.record(ours) as rec:
            sequences, logits = ohf.generate(ours, ids, max_new_tokens=new_tokens, parts=parts, do_sample=False)
        full = ref(sequences[:, :-1]).logits[:, ids.shape[1] - 1 :]
    import overlap

    return {
        "same_tokens": torch.equal(sequences, plain.sequences),
        "vs_plain": _diff(logits, torch.stack(plain.logits, dim=1)),
        "vs_ref": _diff(logits, full),
        "plan": rec.scheduler.recording.order(),
        "report": rec.report(),
        "left": len(overlap.ops.in_flight()),
        "layers": ours.config.num_hidden_layers,
    }


def error_case(path: str, layout: str, dtype: torch.dtype = torch.bfloat16, grad: bool = False) -> str:
    model = load_expert_parallel(path, "overlap", layout=layout, dtype=dtype)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.set_grad_enabled(grad):
        model(ids)
    return "no error"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def _within(d: dict) -> None:
    tol = tolerance(d["dtype"], d["scale"])
    assert d["max"] <= tol, f"worst token {d['token']}: |Δ logit| {d['max']:.4g} > {tol:.4g} ({TOL_ULPS} ulp): {d}"


def _check(result: dict, layout: str = "dp") -> None:
    """Bit-equal to "all_to_all" with one microbatch (the same computation); per token within the
    tolerance of the single process (dp), or of "all_to_all" where TP attention shares the batch."""
    assert result["one_vs_a2a"]["equal"], result["one_vs_a2a"]
    _within(result["vs_ref"] if layout == "dp" else result["vs_a2a"])


def test_registered_and_idempotent():
    assert EPImplementationInterface._global_mapping["overlap"] is ohf.OverlapEP
    ohf.register()
    import importlib

    importlib.reload(ohf)  # importing again registers again, same name
    assert "overlap" in EPImplementationInterface()


def test_tolerance_is_ulps_of_the_logit_scale():
    assert tolerance(torch.bfloat16, 3.0) == 8 * 2.0**-6 == 0.125
    assert tolerance(torch.float16, 3.0) == 8 * 2.0**-9
    assert tolerance(torch.bfloat16, 4.0) == 0.25


@pytest.mark.parametrize(
    "tokens, num, rows",
    [(0, 0, 0), (1, 1, 1), (63, 1, 63), (64, 2, 32), (1024, 2, 512), (1025, 3, 342), (1537, 4, 385)],
)
def test_microbatch_rule(tokens, num, rows):
    assert ohf.num_microbatches(tokens) == num
    assert ohf.microbatch_rows(tokens) == rows
    assert rows <= ohf.MAX_MICROBATCH_TOKENS and rows * num >= tokens


def test_qwen3_two_ranks_own_batches_uneven(rank_pools, models):
    results = rank_pools(2).run(forward_case, models["qwen3"], "dp", (40, 23))
    for r in results:
        _check(r)
        assert r["a2a_vs_ref"]["equal"]  # all_to_all under dp reproduces the single process exactly
        assert r["calls"] == 2 and r["microbatches"] == ["mb0"]
    assert "dispatch_setup@mb0.l1" in results[0]["names"] and "combine@mb0.l0" in results[0]["names"]


def test_record_counts_the_whole_forward(rank_pools, models):
    """The report's makespan is the whole recorded forward (attention included), not the EP calls'
    span; its compute is labelled as the experts only; the speedup is labelled an estimate."""
    for r in rank_pools(2).run(forward_case, models["qwen3"], "dp", (40, 23)):
        rep = r["report"]
        assert rep.makespan >= r["inside_s"]  # the block's own clock, taken around model(ids)
        assert rep.compute_covers == "experts" and rep.compute_busy < rep.makespan
        assert rep.serial_time == rep.makespan + rep.overlap and rep.speedup == rep.serial_time / rep.makespan
        text = str(rep)
        assert "forward (makespan, the whole run)" in text and "compute busy (experts)" in text
        assert "estimated speedup over serial" in text


def test_qwen3_over_512_tokens_per_rank(rank_pools, models):
    results = rank_pools(2).run(forward_case, models["qwen3_1l"], "dp", (700, 530))
    for r in results:
        _check(r)
        assert r["microbatches"] == ["mb0", "mb1"]  # ceil(700 / 2) = 350 rows each, rank 1 padded
        # The scheduler's pipeline: mb1's dispatch travels during mb0's experts, mb0's combine during mb1's.
        pos = {name: i for i, name in enumerate(r["plan"])}
        assert pos["dispatch_setup@mb1.l0"] < pos["experts@mb0.l0"]
        assert pos["combine_setup@mb0.l0"] < pos["experts@mb1.l0"] < pos["combine_teardown@mb0.l0"]


def test_mixtral_two_ranks_share_a_batch(rank_pools, models):
    for r in rank_pools(2).run(forward_case, models["mixtral"], "tp", (37,), 2):
        _check(r, "tp")


def test_mixtral_shared_batch_over_512_per_slice(rank_pools, models):
    for r in rank_pools(2).run(forward_case, models["mixtral"], "tp", (1100,)):
        _check(r, "tp")
        assert r["microbatches"] == ["mb0", "mb1"]  # slices of 550 tokens: 2 microbatches of 275


def test_forced_microbatches_give_the_same_logits(rank_pools, models):
    for r in rank_pools(2).run(forward_case, models["qwen3_1l"], "dp", (40, 7), forced=3):
        _check(r)
        assert r["microbatches"] == ["mb0", "mb1", "mb2"]  # rank 1's last two are all padding


def test_microbatches_refuses_bad_values():
    with pytest.raises(ValueError, match="num must be None or an int >= 1, got 0"):
        with ohf.microbatches(0):
            pass


def test_fp16_model(rank_pools, tmp_path):
    path = save_model(qwen3_config(layers=1), str(tmp_path / "fp16"), dtype=torch.float16)
    for r in rank_pools(2).run(forward_case, path, "dp", (40, 23), dtype=torch.float16):
        assert r["vs_ref"]["dtype"] == torch.float16
        _check(r)


@pytest.mark.parametrize("name, layout", [("qwen3", "dp"), ("mixtral", "tp")])
def test_decode_with_kv_cache(rank_pools, models, name, layout):
    for r in rank_pools(2).run(generate_case, models[name], layout, (12, 9)):
        assert r["new"] == 4
        _within(r["vs_ref"])
        # Prefill: the whole prompt (a TP rank's share of it); then 1 token per decode step (the KV cache).
        first = r["ep_tokens"][: r["layers"]]
        assert all(n == first[0] > 1 for n in first)
        assert r["ep_tokens"][r["layers"] :] == [1] * (3 * r["layers"]) or layout == "tp"
        assert len(r["ep_tokens"]) == 4 * r["layers"] == r["calls"]


def test_two_batch_overlap_in_generate(rank_pools, models):
    """Decode split into parts: part 1's attention and experts run while part 0's dispatch travels,
    in prefill and in every decode step; the tokens are those of the unsplit generate."""
    for r in rank_pools(2).run(two_batch_generate_case, models["qwen3"]):
        assert r["same_tokens"] and r["left"] == 0
        _within(r["vs_ref"])
        _within(r["vs_plain"])
        pos = {name: i for i, name in enumerate(r["plan"])}
        layers = r["layers"]
        for j in range(3 * layers):  # layer j of step j // layers (step 0: prefill)
            assert pos[f"dispatch_setup@mb1.l{j}"] < pos[f"dispatch_teardown@mb0.l{j}"], j
        assert r["report"].compute_covers == "whole model"


def test_generate_refuses_bad_arguments():
    with pytest.raises(ValueError, match="parts must be an int >= 1, got 0"):
        ohf.generate(None, torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2, parts=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        ohf.generate(None, torch.zeros(1, 4, dtype=torch.long), max_new_tokens=0)


@pytest.mark.parametrize("layout", ["dp", "mixed"])
def test_four_ranks(rank_pools, models, layout):
    for r in rank_pools(4).run(forward_case, models["qwen3_8e"], layout, (30, 70, 5, 44)):
        _check(r, layout)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_families_on_four_ranks(rank_pools, tmp_path, family):
    """Every family on 4 ranks, 64 tokens each (2 microbatches of 32), fsdp = ep = 4. GPT-OSS is
    issue 15's model, whose logits differed by 22 % of their maximum before the fix."""
    path = save_model(_family_config(family), str(tmp_path / family))
    for r in rank_pools(4).run(forward_case, path, "dp", (64, 64, 64, 64)):
        _check(r)
        assert r["microbatches"] == ["mb0", "mb1"]


def _errors(pool, *args, **kwargs) -> list[str]:
    outcomes = pool.run_outcomes(error_case, *args, **kwargs)
    assert all(not ok for ok, _ in outcomes), outcomes
    return [f"{value[0]}: {value[1]}" for _, value in outcomes]


def test_512_experts_run_and_514_are_refused(rank_pools, tmp_path):
    """The ops' limit: at most 512 experts. 512 run (bit-equal to all_to_all); 514 raise a
    ValueError naming the config field while the model loads, before any communication."""
    small = dict(layers=1, moe_intermediate_size=8, intermediate_size=16)
    path = save_model(qwen3_config(experts=512, **small), str(tmp_path / "e512"))
    for r in rank_pools(2).run(forward_case, path, "dp", (20, 13)):
        _check(r)
    path = save_model(qwen3_config(experts=514, **small), str(tmp_path / "e514"))
    for message in _errors(rank_pools(2), path, "dp"):
        assert message.startswith("ValueError") and "num_experts in (0, 512], got num_experts = 514" in message


def test_refuses_hidden_size_outside_the_ops_range(rank_pools, tmp_path):
    path = save_model(qwen3_config(layers=1, hidden_size=512, num_attention_heads=4, head_dim=128), str(tmp_path / "m"))
    for message in _errors(rank_pools(2), path, "tp"):
        assert message.startswith("ValueError") and "qwen3_moe" in message and "hidden_size = 512" in message


def test_refuses_more_than_16_experts_per_token(rank_pools, tmp_path):
    path = save_model(mixtral_config(num_local_experts=32, num_experts_per_tok=17), str(tmp_path / "m"))
    for message in _errors(rank_pools(2), path, "tp"):
        assert "mixtral" in message and "num_experts_per_tok = 17" in message


def test_refuses_float32_model(rank_pools, models):
    for message in _errors(rank_pools(2), models["qwen3_1l"], "tp", torch.float32):
        assert "ValueError" in message and "dtype=torch.bfloat16" in message


def test_training_raises_a_clear_error(rank_pools, models):
    for message in _errors(rank_pools(2), models["qwen3_1l"], "tp", grad=True):
        assert message.startswith("NotImplementedError") and "inference only" in message and "all_to_all" in message


def two_batch_case(path: str, fibers: int = 2) -> dict:
    """Two-batch overlap over the whole model: the scheduler runs the model once per half of the
    batch as fibers, so one half's attention hides the other half's dispatch and combine."""
    import overlap

    world = dist.get_world_size()
    ids = _prompt("dp", (40, 23), batch=fibers)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ours = _load(path, "dp", "overlap", world)
    with torch.no_grad():
        expected = ref(ids).logits
        plain = ours(ids).logits
        with overlap.scheduler(microbatches=fibers, min_tokens=1) as s:
            got = overlap.wrap(ours)(ids, use_cache=False).logits
    return {
        "vs_ref": _diff(got, expected),
        "equal_to_plain": torch.equal(got, plain),
        "plan": s.recording.order(),
        "left": len(overlap.ops.in_flight()),
    }


@pytest.mark.parametrize("fibers", [2, 4])
def test_two_batch_overlap_over_the_whole_model(rank_pools, models, fibers):
    """With 4 fibers, one microbatch's EP call ends (transformers restores the DTensor expert
    weights) while others are still inside theirs: the experts must still see local weights."""
    for r in rank_pools(2).run(two_batch_case, models["qwen3"], fibers):
        _within(r["vs_ref"])
        assert r["equal_to_plain"] and r["left"] == 0
        pos = {name: i for i, name in enumerate(r["plan"])}
        # mb1 computes (attention, router) and dispatches while mb0's dispatch travels, in every layer.
        for layer in (0, 1):
            assert pos[f"dispatch_setup@mb1.l{layer}"] < pos[f"dispatch_teardown@mb0.l{layer}"]


# --------------------------------------------------------------------------------------------
# Registration in every process that loads a model (issue 21 item 5)
# --------------------------------------------------------------------------------------------


def _check_fresh_rank(res: dict) -> None:
    assert not res["imported_before_load"], res  # nothing imported the integration before the load
    assert res["implementations"] == ["OverlapEP"], res
    assert res["finite"], res


def test_spawned_ranks_know_overlap_without_importing_the_integration(tmp_path):
    """Fresh spawned ranks (not the session's pool, which imported the integration long ago) whose
    code never imports `overlap.integrations.transformers`: `import overlap` registered it."""
    from overlap.launch import RankPool

    from .spawned_hf import load_and_run

    path = save_model(qwen3_config(layers=1), str(tmp_path / "qwen3"))
    with RankPool(2) as pool:
        for res in pool.run(load_and_run, path, timeout_s=300):
            _check_fresh_rank(res)


@pytest.mark.timeout(660)  # past the subprocess's own 600 s bound, so that bound reports a hang
def test_torchrun_ranks_know_overlap_without_importing_the_integration(tmp_path):
    import json
    import os
    import subprocess
    import sys

    path = save_model(qwen3_config(layers=1), str(tmp_path / "qwen3"))
    script = os.path.join(os.path.dirname(__file__), "spawned_hf.py")
    # What the README asks of torchrun jobs: idle OpenMP threads must not spin (on a loaded host two
    # spinning teams starve the ranks' start-up and their exchanges).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, path]
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that dies or hangs says where
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"torchrun job did not end within 600 s\nstdout: {out[-2000:]}\nstderr: {err[-4000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in results) == [0, 1], done.stdout
    for res in results:
        _check_fresh_rank(res)


def test_import_order_does_not_matter():
    """In fresh interpreters: overlap first, then transformers' EP module, and the other way round."""
    import subprocess
    import sys

    check = "from transformers.distributed.expert_parallel import EPImplementationInterface as I; "
    for code in (f"import overlap; {check}", f"{check}import overlap; "):
        code += "assert 'overlap' in I(), list(I())"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
