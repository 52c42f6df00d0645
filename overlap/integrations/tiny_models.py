"""Tiny random transformers MoE models of each family, for examples, benchmarks and tests.

Owns: one small config per model family the integration supports (hidden size 1024, the ops'
smallest, top-2 routing), saving a randomly initialised model of it, and loading a saved model
expert parallel with a given `ep_implementation`. Never downloads anything: the weights are drawn
from a seeded generator, so every rank (and a single-process reference) builds the same model.

    path = save_random_model(family_config("gpt_oss"), "/tmp/gpt_oss")
    model = load_expert_parallel(path, "overlap")          # inside an initialised process group
"""

from __future__ import annotations

from typing import Any

import torch

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral")
LAYOUTS = ("dp", "tp", "mixed")


def family_config(
    name: str,
    *,
    layers: int | None = None,
    experts: int = 8,
    moe_intermediate: int = 64,
    vocab_size: int = 256,
    **overrides: Any,
) -> Any:
    """A small config of family `name`: `experts` routed experts, top-2, hidden size 1024.

    Args:
        name: one of `FAMILIES`.
        layers: decoder layers (default: 2 for gpt_oss, as in the GPT-OSS 4-rank case, else 1).
        experts: routed experts.
        moe_intermediate: each expert's intermediate size (dense MLPs get twice that).
        vocab_size: vocabulary size.
        overrides: any other config field.

    Raises:
        ValueError: an unknown family.
    """
    import transformers

    layers = layers if layers is not None else (2 if name == "gpt_oss" else 1)
    common = dict(
        hidden_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        eos_token_id=None,
    )
    mi = moe_intermediate
    cls: Any
    kw: dict[str, Any]
    if name == "qwen3_moe":
        cls, kw = (
            transformers.Qwen3MoeConfig,
            dict(
                common,
                intermediate_size=2 * mi,
                moe_intermediate_size=mi,
                num_experts=experts,
                num_experts_per_tok=2,
                head_dim=128,
                num_key_value_heads=2,
            ),
        )
    elif name == "olmoe":
        cls, kw = (
            transformers.OlmoeConfig,
            dict(common, intermediate_size=mi, num_experts=experts, num_experts_per_tok=2),
        )
    elif name == "qwen2_moe":  # a shared expert inside the model's own MoE block
        cls, kw = (
            transformers.Qwen2MoeConfig,
            dict(
                common,
                intermediate_size=2 * mi,
                moe_intermediate_size=mi,
                shared_expert_intermediate_size=mi,
                num_experts=experts,
                num_experts_per_tok=2,
            ),
        )
    elif name == "gpt_oss":  # experts with biases, a clamped activation, bf16 routing weights
        cls, kw = (
            transformers.GptOssConfig,
            dict(
                hidden_size=1024,
                intermediate_size=256,
                num_hidden_layers=layers,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=64,
                num_local_experts=experts,
                num_experts_per_tok=2,
                vocab_size=vocab_size,
            ),
        )
    elif name == "deepseek_v3":  # grouped routing, shared experts, MLA attention, fp32 routing weights
        cls, kw = (
            transformers.DeepseekV3Config,
            dict(
                common,
                intermediate_size=2 * mi,
                moe_intermediate_size=mi,
                n_routed_experts=experts,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=0,
                n_group=1,
                topk_group=1,
                kv_lora_rank=64,
                q_lora_rank=None,
                qk_rope_head_dim=32,
                qk_nope_head_dim=64,
                v_head_dim=64,
            ),
        )
    elif name == "mixtral":
        cls, kw = (
            transformers.MixtralConfig,
            dict(
                common,
                intermediate_size=mi,
                num_local_experts=experts,
                num_experts_per_tok=2,
                head_dim=128,
                num_key_value_heads=2,
            ),
        )
    else:
        raise ValueError(f"name must be one of {FAMILIES}, got {name!r}")
    return cls(**{**kw, **overrides})


def save_random_model(config: Any, path: str, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> str:
    """Save a model of `config` with weights drawn from `seed` to `path`; returns `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path)
    return path


def load_expert_parallel(
    path: str, implementation: str, *, layout: str = "dp", dtype: torch.dtype = torch.bfloat16
) -> Any:
    """Load `path` expert parallel over the default process group with `ep_implementation`.

    Args:
        path: a saved model.
        implementation: "overlap" (known in every process that imported overlap) or "all_to_all".
        layout: "dp" (each rank its own batch: `fsdp_size = ep_size`), "tp" (the group shares one
            batch: `tp_size = ep_size`) or "mixed" (`tp_size = 2` share a batch, `ep_size` over
            fsdp x tp).
        dtype: the weights' dtype.

    Raises:
        ValueError: an unknown layout.
    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    world = dist.get_world_size()
    sizes: dict[str, Any] = {
        "dp": {"fsdp_size": world},
        "tp": {"tp_size": world},
        "mixed": {"tp_size": 2, "fsdp_size": world // 2},
    }[layout]
    config = DistributedConfig(ep_size=world, ep_implementation=implementation, **sizes)
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=dtype)
