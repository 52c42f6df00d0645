"""`ep_implementation="overlap"` on real transformers MoE models (Qwen3-MoE, Mixtral) over gloo ranks.

Models are tiny (hidden 1024, 1-2 layers, 4 or 8 experts, vocab 256), built from configs with fixed
seeds and random bf16 weights, saved once per session and loaded on every rank with
`from_pretrained(distributed_config=...)`, the path users take.

Tolerance, and why: transformers' experts add a token's k expert outputs in bf16 (`index_add_`), our
combine_teardown adds them in fp32 and rounds once (the ops' contract), so the MoE output differs by
about one bf16 ulp in some elements; the random-weight layers downstream magnify that. We require
max |Δ logit| <= MAX_TOL and mean |Δ logit| <= MEAN_TOL (logits are O(3)); a wrong route, weight or
row order gives O(1) differences. "all_to_all" on the same distributed model is the second reference:
with a TP group sharing the batch, the attention itself is tensor-parallel and its rounding can flip
a near-tied route, so "all_to_all" too can differ from the single process by O(1) in a few logits;
there the max is checked against "all_to_all" (and the mean against the single process).
Ranks holding different batches use FSDP2 (`fsdp_size = ep_size`), which refuses
`torch.inference_mode` (its unshard touches version counters), so those runs use `torch.no_grad`.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig
from transformers.distributed import DistributedConfig
from transformers.distributed.expert_parallel import EPImplementationInterface

import overlap.integrations.transformers as ohf

MAX_TOL = 0.25
MEAN_TOL = 0.01
VOCAB = 256


def qwen3_config(layers: int = 2, experts: int = 4, **kw) -> Qwen3MoeConfig:
    base = dict(hidden_size=1024, intermediate_size=128, moe_intermediate_size=64, num_experts=experts,
                num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                head_dim=128, vocab_size=VOCAB, max_position_embeddings=4096, eos_token_id=None)
    return Qwen3MoeConfig(**{**base, **kw})


def mixtral_config(layers: int = 1, experts: int = 4, **kw) -> MixtralConfig:
    base = dict(hidden_size=1024, intermediate_size=64, num_local_experts=experts, num_experts_per_tok=2,
                num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                vocab_size=VOCAB, max_position_embeddings=4096, eos_token_id=None)
    return MixtralConfig(**{**base, **kw})


def save_model(config, path: str, dtype: torch.dtype = torch.bfloat16) -> str:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path)
    return path


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


def _load(path: str, layout: str, impl: str, world: int):
    """layout: "dp" (each rank its own batch: fsdp = ep = world), "tp" (the group shares one
    batch: tp = ep = world), "mixed" (tp = 2 share a batch, ep = world over fsdp * tp)."""
    sizes = {"dp": dict(fsdp_size=world), "tp": dict(tp_size=world),
             "mixed": dict(tp_size=2, fsdp_size=world // 2)}[layout]
    config = DistributedConfig(ep_size=world, ep_implementation=impl, **sizes)
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.bfloat16)


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
    d = (a.float() - b.float()).abs()
    return {"max": float(d.max()), "mean": float(d.mean()), "scale": float(b.float().abs().max())}


def forward_case(path: str, layout: str, lengths: tuple[int, ...], batch: int = 1, forced: int | None = None) -> dict:
    world = dist.get_world_size()
    ids = _prompt(layout, lengths, batch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ours = _load(path, layout, "overlap", world)
    theirs = _load(path, layout, "all_to_all", world)
    with torch.no_grad():
        expected = ref(ids).logits
        with ohf.record(ours) as rec, ohf.microbatches(forced):
            got = ours(ids).logits
        a2a = theirs(ids).logits
    names = rec.timeline.order()
    return {"tokens": ids.numel(), "vs_ref": _diff(got, expected), "vs_a2a": _diff(got, a2a),
            "a2a_vs_ref": _diff(a2a, expected), "calls": rec.num_calls,
            "microbatches": sorted({n.split("@")[1].split(".")[0] for n in names}),
            "names": names, "report": rec.report(), "plan": [str(step.node) for step in rec.scheduler.plan.steps]}


def generate_case(path: str, layout: str, lengths: tuple[int, ...], new_tokens: int = 4) -> dict:
    """Greedy generate through overlap; every step's logits against the single-process model run
    on the same (prompt + generated) sequence, so a rounding tie cannot make the check flaky."""
    world = dist.get_world_size()
    ids = _prompt(layout, lengths)
    ours = _load(path, layout, "overlap", world)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        with ohf.record(ours) as rec:
            out = ours.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                return_dict_in_generate=True, output_logits=True)
        steps = torch.stack(out.logits, dim=1)  # (B, new_tokens, V)
        full = ref(out.sequences[:, :-1]).logits[:, ids.shape[1] - 1 :]
    return {"new": out.sequences.shape[1] - ids.shape[1], "vs_ref": _diff(steps, full), "calls": rec.num_calls}


def error_case(path: str, layout: str, dtype: torch.dtype = torch.bfloat16, grad: bool = False) -> str:
    world = dist.get_world_size()
    config = DistributedConfig(ep_size=world, ep_implementation="overlap",
                               **({"fsdp_size": world} if layout == "dp" else {"tp_size": world}))
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=dtype)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.set_grad_enabled(grad):
        model(ids)
    return "no error"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def _check(result: dict) -> None:
    """Mean against the single process always; max against it, or, where TP attention already moves
    "all_to_all" further than MAX_TOL from the single process, max against "all_to_all"."""
    assert result["vs_ref"]["mean"] <= MEAN_TOL, result
    if "vs_a2a" in result and result["a2a_vs_ref"]["max"] > MAX_TOL:
        assert result["vs_a2a"]["max"] <= MAX_TOL, result
    else:
        assert result["vs_ref"]["max"] <= MAX_TOL, result


def test_registered_and_idempotent():
    assert EPImplementationInterface._global_mapping["overlap"] is ohf.OverlapEP
    ohf.register()
    import importlib

    importlib.reload(ohf)  # importing again registers again, same name
    assert "overlap" in EPImplementationInterface()


@pytest.mark.parametrize("tokens, num, rows", [(0, 0, 0), (1, 1, 1), (63, 1, 63), (64, 2, 32), (1024, 2, 512),
                                               (1025, 3, 342), (1537, 4, 385)])
def test_microbatch_rule(tokens, num, rows):
    assert ohf.num_microbatches(tokens) == num
    assert ohf.microbatch_rows(tokens) == rows
    assert rows <= ohf.MAX_MICROBATCH_TOKENS and rows * num >= tokens


def test_qwen3_two_ranks_own_batches_uneven(rank_pools, models):
    results = rank_pools(2).run(forward_case, models["qwen3"], "dp", (40, 23))
    for r in results:
        _check(r)
        assert r["a2a_vs_ref"]["max"] == 0.0  # all_to_all under dp reproduces the single process exactly
        assert r["calls"] == 2 and r["microbatches"] == ["mb0"]
    assert "dispatch_setup@mb0.l1" in results[0]["names"] and "combine@mb0.l0" in results[0]["names"]


def test_qwen3_over_512_tokens_per_rank(rank_pools, models):
    results = rank_pools(2).run(forward_case, models["qwen3_1l"], "dp", (700, 530))
    for r in results:
        _check(r)
        assert r["microbatches"] == ["mb0", "mb1"]  # ceil(700 / 2) = 350 rows each, rank 1 padded
        # The scheduler's pipeline: mb1's dispatch travels during mb0's experts, mb0's combine during mb1's.
        pos = {name: i for i, name in enumerate(r["plan"])}
        assert pos["dispatch_setup@mb1.l0"] < pos["experts@mb0.l0"]
        assert pos["combine_setup@mb0.l0"] < pos["experts@mb1.l0"] < pos["combine_teardown@mb0.l0"]
        report = r["report"]
        assert report.comm_busy > 0 and report.compute_busy > 0 and 0.0 <= report.hidden_fraction <= 1.0


def test_mixtral_two_ranks_share_a_batch(rank_pools, models):
    for r in rank_pools(2).run(forward_case, models["mixtral"], "tp", (37,), 2):
        _check(r)
        assert r["vs_a2a"]["max"] <= MAX_TOL


def test_mixtral_shared_batch_over_512_per_slice(rank_pools, models):
    for r in rank_pools(2).run(forward_case, models["mixtral"], "tp", (1100,)):
        _check(r)
        assert r["microbatches"] == ["mb0", "mb1"]  # slices of 550 tokens: 2 microbatches of 275


def test_forced_microbatches_give_the_same_logits(rank_pools, models):
    for r in rank_pools(2).run(forward_case, models["qwen3_1l"], "dp", (40, 7), forced=3):
        _check(r)
        assert r["microbatches"] == ["mb0", "mb1", "mb2"]  # rank 1's last two are all padding


def test_microbatches_refuses_bad_values():
    with pytest.raises(ValueError, match="num must be None or an int >= 1, got 0"):
        with ohf.microbatches(0):
            pass


@pytest.mark.parametrize("name, layout", [("qwen3", "dp"), ("mixtral", "tp")])
def test_generate(rank_pools, models, name, layout):
    for r in rank_pools(2).run(generate_case, models[name], layout, (12, 9)):
        assert r["new"] == 4
        _check(r)


@pytest.mark.parametrize("layout", ["dp", "mixed"])
def test_four_ranks(rank_pools, models, layout):
    for r in rank_pools(4).run(forward_case, models["qwen3_8e"], layout, (30, 70, 5, 44)):
        _check(r)


def _errors(pool, *args, **kwargs) -> list[str]:
    outcomes = pool.run_outcomes(error_case, *args, **kwargs)
    assert all(not ok for ok, _ in outcomes), outcomes
    return [f"{value[0]}: {value[1]}" for _, value in outcomes]


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
    return {"vs_ref": _diff(got, expected), "equal_to_plain": torch.equal(got, plain),
            "plan": s.recording.order(), "left": len(overlap.ops.in_flight())}


@pytest.mark.parametrize("fibers", [2, 4])
def test_two_batch_overlap_over_the_whole_model(rank_pools, models, fibers):
    """With 4 fibers, one microbatch's EP call ends (transformers restores the DTensor expert
    weights) while others are still inside theirs: the experts must still see local weights."""
    for r in rank_pools(2).run(two_batch_case, models["qwen3"], fibers):
        assert r["vs_ref"]["max"] <= MAX_TOL and r["vs_ref"]["mean"] <= MEAN_TOL, r["vs_ref"]
        assert r["equal_to_plain"] and r["left"] == 0
        pos = {name: i for i, name in enumerate(r["plan"])}
        # mb1 computes (attention, router) and dispatches while mb0's dispatch travels, in every layer.
        for layer in (0, 1):
            assert pos[f"dispatch_setup@mb1.l{layer}"] < pos[f"dispatch_teardown@mb0.l{layer}"]


def _family_config(name: str):
    import transformers

    common = dict(hidden_size=1024, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                  vocab_size=VOCAB, max_position_embeddings=4096, eos_token_id=None)
    if name == "olmoe":
        return transformers.OlmoeConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2, **common)
    if name == "qwen2_moe":  # a shared expert inside the model's own MoE block
        return transformers.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=64, num_experts=4,
                                           num_experts_per_tok=2, **common)
    if name == "gpt_oss":  # experts with biases and a clamped activation
        return transformers.GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                         head_dim=64, sliding_window=128, **common)
    if name == "deepseek_v3":  # grouped routing, shared experts, MLA attention
        return transformers.DeepseekV3Config(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                             n_group=1, topk_group=1, kv_lora_rank=64, q_lora_rank=None,
                                             qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, **common)
    raise ValueError(name)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_other_model_families(rank_pools, tmp_path, family):
    path = save_model(_family_config(family), str(tmp_path / family))
    for r in rank_pools(2).run(forward_case, path, "dp", (40, 23)):
        _check(r)
        assert r["vs_a2a"]["max"] <= MAX_TOL
