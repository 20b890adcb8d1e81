"""vLLM's real MoE model classes on CPU, for the EplbState integration tests.

Tiny Hugging Face configs, built by vLLM's own loader (dummy weights) on
gloo ranks with expert parallelism; distinct per-expert weights fed through
the model's own ``load_weights``; a stand-in for the router's EPLB kernel
(which is the identity off CUDA/XPU); and the check that every routed slot
holds its logical expert's original weights.

Pure helpers (configs, synthetic routing, digests, the check, balancedness)
need no process group; the few that build models need vLLM's parallel state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MODEL_SPECS",
    "Mismatch",
    "ModelSpec",
    "balancedness_of",
    "check_routed_slots",
    "expert_checkpoint",
    "inconsistent_maps",
    "route_and_record",
    "skewed_topk",
    "slot_digests",
]

_KNUTH = 2654435769  # floor(2^32 / phi): the multiplier of vLLM's EPLB kernel


@dataclass(frozen=True)
class ModelSpec:
    """One tiny model: its HF config and how its experts are named."""

    name: str
    config: dict[str, Any]
    num_experts: int
    top_k: int
    num_groups: int = 1
    """Expert groups of grouped routing (``n_group``); 1 when ungrouped."""
    topk_groups: int = 1
    mtp: bool = False
    """Build the DeepSeek MTP drafter (itself MoE) as vLLM's spec decode does."""
    expert_names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    expert_prefix: str = "mlp.experts"
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    """Decoder layers without MoE (DeepSeek's ``first_k_dense_replace``)."""


_COMMON = {
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
}

_GROUPED_ROUTING = {
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
}
"""DeepSeek-style routing shared by V2, V3 and GLM4: 8 experts in 4 groups."""

_MLA = {
    "num_key_value_heads": 4,
    "moe_layer_freq": 1,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 16,
}
"""DeepSeek's multi-head latent attention at the tiny size."""

MODEL_SPECS: dict[str, ModelSpec] = {
    "qwen3_moe": ModelSpec(
        name="qwen3_moe",
        config={
            **_COMMON,
            "architectures": ["Qwen3MoeForCausalLM"],
            "moe_intermediate_size": 32,
            "model_type": "qwen3_moe",
            "num_hidden_layers": 3,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_experts": 8,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        num_experts=8,
        top_k=2,
    ),
    "deepseek_v3_mtp": ModelSpec(
        name="deepseek_v3_mtp",
        config={
            **_COMMON,
            **_GROUPED_ROUTING,
            **_MLA,
            "architectures": ["DeepseekV3ForCausalLM"],
            "moe_intermediate_size": 32,
            "model_type": "deepseek_v3",
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "q_lora_rank": 32,
            "num_nextn_predict_layers": 1,
        },
        num_experts=8,
        top_k=2,
        num_groups=4,
        topk_groups=2,
        mtp=True,
        dense_layers=(0,),
    ),
    "deepseek_v2": ModelSpec(
        name="deepseek_v2",
        config={
            **_COMMON,
            **_GROUPED_ROUTING,
            **_MLA,
            "architectures": ["DeepseekV2ForCausalLM"],
            "moe_intermediate_size": 32,
            "model_type": "deepseek_v2",
            "num_hidden_layers": 2,
            "first_k_dense_replace": 0,
            "topk_method": "group_limited_greedy",
            "scoring_func": "softmax",
            "routed_scaling_factor": 1.0,
            "norm_topk_prob": False,
            "q_lora_rank": None,
        },
        num_experts=8,
        top_k=2,
        num_groups=4,
        topk_groups=2,
    ),
    "glm4_moe": ModelSpec(
        name="glm4_moe",
        config={
            **_COMMON,
            **_GROUPED_ROUTING,
            "architectures": ["Glm4MoeForCausalLM"],
            "moe_intermediate_size": 32,
            "model_type": "glm4_moe",
            "num_hidden_layers": 2,
            "first_k_dense_replace": 0,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "partial_rotary_factor": 0.5,
            "routed_scaling_factor": 1.0,
            "norm_topk_prob": True,
            "use_qk_norm": False,
            "attention_bias": False,
            "num_nextn_predict_layers": 0,
        },
        num_experts=8,
        top_k=2,
        num_groups=4,
        topk_groups=2,
    ),
    "mixtral": ModelSpec(
        name="mixtral",
        config={
            **_COMMON,
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_local_experts": 8,
        },
        num_experts=8,
        top_k=2,
        expert_names=("w1", "w3", "w2"),
        expert_prefix="block_sparse_moe.experts",
    ),
}


def write_config(spec: ModelSpec, directory: Path) -> Path:
    """Write ``spec``'s ``config.json`` into ``directory``; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(spec.config, indent=1))
    return directory


# -- distinct expert weights --------------------------------------------------
def _expert_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    cfg = spec.config
    hidden = cfg["hidden_size"]
    inter = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    gate, up, down = spec.expert_names
    return {gate: (inter, hidden), up: (inter, hidden), down: (hidden, inter)}


def expert_checkpoint(
    spec: ModelSpec,
    layers: Sequence[int],
    dtype: torch.dtype,
    *,
    seed: int,
    layer_prefix: str = "model.layers",
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF per-expert checkpoint entries, a distinct tensor for every expert.

    Values are a function of (seed, layer, expert, name) only, so every rank
    feeds the same checkpoint, as it would read it from disk.
    """
    for layer in layers:
        for expert in range(spec.num_experts):
            for index, (name, shape) in enumerate(_expert_shapes(spec).items()):
                gen = torch.Generator().manual_seed(
                    seed * 1_000_003 + layer * 10_007 + expert * 101 + index
                )
                value = torch.randn(shape, generator=gen) * 0.05
                key = f"{layer_prefix}.{layer}.{spec.expert_prefix}.{expert}"
                yield f"{key}.{name}.weight", value.to(dtype)


# -- the router's EPLB kernel, on CPU ---------------------------------------
def skewed_topk(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    *,
    hot: Sequence[int],
    generator: torch.Generator,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> torch.Tensor:
    """Logical ``topk_ids [num_tokens, top_k]`` skewed towards ``hot`` experts.

    Expert ``hot[i]`` has weight ``2 ** -i`` (a steep, Zipf-like skew); with
    grouped routing each token first picks ``topk_groups`` of ``num_groups``
    groups by their summed weight, as DeepSeek's router limits its choice.
    """
    weight = torch.full((num_experts,), 1.0 / 64)
    for rank, expert in enumerate(hot):
        weight[expert] += 2.0**-rank
    probs = weight.expand(num_tokens, -1).clone()
    if num_groups > 1:
        group_weight = probs.view(num_tokens, num_groups, -1).sum(-1)
        groups = torch.multinomial(group_weight, topk_groups, generator=generator)
        keep = torch.zeros(num_tokens, num_groups, dtype=torch.bool)
        keep.scatter_(1, groups, True)
        probs = probs * keep.repeat_interleave(num_experts // num_groups, dim=1)
    return torch.multinomial(probs, top_k, generator=generator)


def route_and_record(
    topk_ids: torch.Tensor,
    layer_state: Any,
    ubatch: int = 0,
) -> torch.Tensor:
    """What vLLM's CUDA kernel ``_eplb_map_and_record_i32_kernel`` does.

    Maps logical ids to physical slots through the layer's
    ``logical_to_physical_map`` / ``logical_replica_count`` (replica chosen by
    a Knuth multiplicative hash of the token index), and adds one to
    ``expert_load_view`` per (token, expert) of the first
    ``num_unpadded_tokens`` tokens when ``should_record_tensor`` is set.
    Off CUDA/XPU vLLM's router does neither, so the test does it.
    """
    log2phy = layer_state.logical_to_physical_map
    logcnt = layer_state.logical_replica_count
    load = layer_state.expert_load_view
    num_tokens, _ = topk_ids.shape
    token = torch.arange(num_tokens, dtype=torch.int64)[:, None]
    replica = ((token * _KNUTH) & 0xFFFFFFFF) % logcnt[topk_ids].clamp_min(1)
    physical = log2phy[topk_ids, replica]
    if bool(layer_state.should_record_tensor):
        unpadded = int(layer_state.num_unpadded_tokens_tensors[ubatch])
        counted = physical[:unpadded].reshape(-1)
        counted = counted[(counted >= 0) & (counted < load.shape[0])]
        load.index_add_(0, counted, torch.ones_like(counted, dtype=load.dtype))
    return physical


# -- digests and the check ----------------------------------------------------
def _digest(row: torch.Tensor) -> int:
    """64-bit BLAKE2b of the row's bytes: any changed bit changes it."""
    raw = row.detach().contiguous().view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def slot_digests(expert_weights: Sequence[Sequence[torch.Tensor]]) -> list:
    """``[layer][local slot][tensor]`` digest of this rank's expert weights."""
    return [
        [
            tuple(_digest(tensor[slot]) for tensor in layer)
            for slot in range(layer[0].shape[0])
        ]
        for layer in expert_weights
    ]


@dataclass(frozen=True)
class Mismatch:
    """A routed slot that does not hold its logical expert's original weights."""

    layer: int
    expert: int
    slot: int
    tensors: tuple[int, ...]
    """Indices (into ``get_expert_weights()``) of the tensors that differ."""


def check_routed_slots(
    expected: Sequence[Sequence[tuple[int, ...]]],
    digests: Sequence[Sequence[tuple[int, ...]]],
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
) -> list[Mismatch]:
    """Every slot ``log2phy[l, e, r]``, ``r < logcnt[l, e]``, holds expert e.

    ``expected[l][e]``: digests of logical expert e's original tensors;
    ``digests[l][p]``: digests of global physical slot p (all ranks joined).
    """
    bad = []
    num_layers, num_experts = logcnt.shape
    num_slots = len(digests[0])
    for layer in range(num_layers):
        for expert in range(num_experts):
            count = int(logcnt[layer, expert])
            if count < 1:
                bad.append(Mismatch(layer, expert, -1, ()))
            for replica in range(count):
                slot = int(log2phy[layer, expert, replica])
                if not 0 <= slot < num_slots:
                    bad.append(Mismatch(layer, expert, slot, ()))
                    continue
                want, got = expected[layer][expert], digests[layer][slot]
                differ = tuple(
                    i for i, (w, g) in enumerate(zip(want, got, strict=True)) if w != g
                )
                if differ:
                    bad.append(Mismatch(layer, expert, slot, differ))
    return bad


def inconsistent_maps(
    phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor
) -> list[tuple[int, int]]:
    """(layer, slot) where ``phy2log`` disagrees with ``log2phy``/``logcnt``.

    The routers read ``log2phy``; the load window attributes physical load to
    logical experts through ``phy2log``. Every slot must be listed exactly
    once, under the expert ``phy2log`` names.
    """
    bad = []
    num_layers, num_slots = phy2log.shape
    for layer in range(num_layers):
        seen: dict[int, int] = {}
        for expert in range(logcnt.shape[1]):
            for replica in range(int(logcnt[layer, expert])):
                slot = int(log2phy[layer, expert, replica])
                seen[slot] = seen.get(slot, 0) + 1
                if not 0 <= slot < num_slots or int(phy2log[layer, slot]) != expert:
                    bad.append((layer, slot))
        bad += [(layer, s) for s in range(num_slots) if seen.get(s, 0) != 1]
    return bad


def balancedness_of(
    phy2log: torch.Tensor, logical_load: torch.Tensor, num_ranks: int
) -> float:
    """vLLM's balancedness of a placement: sum of per-layer mean tokens per
    rank over sum of per-layer max.

    Each logical expert's load is split evenly over its replicas (what the
    router's hash does on average).
    """
    phy2log = phy2log.long()
    load = logical_load.double()
    replicas = torch.zeros_like(load).scatter_add_(
        1, phy2log, torch.ones_like(phy2log, dtype=load.dtype)
    )
    per_slot = torch.gather(load / replicas.clamp_min(1), 1, phy2log)
    per_rank = per_slot.reshape(per_slot.shape[0], num_ranks, -1).sum(dim=2)
    peak = float(per_rank.max(dim=1).values.sum())
    return float(per_rank.mean(dim=1).sum()) / peak if peak > 0 else 1.0


# -- building with vLLM (needs vLLM and, for the model, its parallel state) ---
@dataclass
class BuiltModels:
    """A target model and, for MTP specs, its MoE drafter, as vLLM builds them."""

    vllm_config: Any
    model: Any
    model_config: Any
    drafter: Any = None
    draft_model_config: Any = None

    def registered(self) -> list[tuple[Any, Any, str | None]]:
        """(model, model_config, model_name) in the model runner's add_model order.

        vLLM's ``GPUModelRunner.load_model`` registers the drafter first,
        named ``"<model> (draft)"``, then the target.
        """
        out = []
        if self.drafter is not None:
            name = f"{self.draft_model_config.model} (draft)"
            out.append((self.drafter, self.draft_model_config, name))
        out.append((self.model, self.model_config, None))
        return out


def moe_layer_ids(spec: ModelSpec) -> list[int]:
    """Decoder layers of the target that have routed experts."""
    layers = range(spec.config["num_hidden_layers"])
    return [i for i in layers if i not in spec.dense_layers]


def make_vllm_config(
    spec: ModelSpec, directory: Path, world: int, eplb_config: Any
) -> Any:
    """vLLM's engine config for ``spec`` on ``world`` EP ranks, EPLB on.

    vLLM refuses EPLB on CPU when it validates the config, so ``enable_eplb``
    and the EPLB config are set after construction (before the model and
    the parallel groups are built: both read them).
    """
    from vllm.config import (
        DeviceConfig,
        LoadConfig,
        ModelConfig,
        ParallelConfig,
        SpeculativeConfig,
        VllmConfig,
    )

    path = str(write_config(spec, directory))
    model_config = ModelConfig(
        model=path,
        tokenizer=path,
        skip_tokenizer_init=True,
        dtype=spec.config["torch_dtype"],
        max_model_len=128,
        enforce_eager=True,
    )
    parallel_config = ParallelConfig(
        tensor_parallel_size=world, enable_expert_parallel=True
    )
    speculative = None
    if spec.mtp:
        speculative = SpeculativeConfig(
            method="mtp",
            num_speculative_tokens=1,
            target_model_config=model_config,
            target_parallel_config=parallel_config,
        )
    vllm_config = VllmConfig(
        model_config=model_config,
        parallel_config=parallel_config,
        load_config=LoadConfig(load_format="dummy"),
        device_config=DeviceConfig("cpu"),
        speculative_config=speculative,
    )
    parallel_config.enable_eplb = True
    parallel_config.eplb_config = eplb_config
    return vllm_config


def skip_missing_cpu_prepack() -> bool:
    """Leave MoE weights unpacked where vLLM's CPU prepack op is missing.

    vLLM 0.33 prepacks CPU MoE weights into its grouped-GEMM layout after
    loading (``cpu_moe.cpu_prepack_moe_weight``); its CUDA wheel, used on a
    CPU machine with ``VLLM_TARGET_DEVICE=cpu``, has no such op. The tests
    never run a forward pass, so the weights stay in checkpoint layout (EPLB
    moves whole expert rows either way). True when the patch was applied.
    """
    try:
        from vllm.model_executor.layers.fused_moe.experts import cpu_moe
    except ImportError:  # vLLM 0.32: no prepack step
        return False
    if not hasattr(cpu_moe, "cpu_prepack_moe_weight"):
        return False
    if hasattr(torch.ops._C, "prepack_moe_weight"):
        return False
    cpu_moe.cpu_prepack_moe_weight = lambda weight, isa: weight
    return True


def build_models(vllm_config: Any) -> BuiltModels:
    """Build the target (and MTP drafter) with vLLM's loader, dummy weights."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model

    skip_missing_cpu_prepack()

    with set_current_vllm_config(vllm_config):
        model = get_model(vllm_config=vllm_config)
        built = BuiltModels(vllm_config, model, vllm_config.model_config)
        speculative = vllm_config.speculative_config
        if speculative is not None:
            built.draft_model_config = speculative.draft_model_config
            built.drafter = get_model(
                vllm_config=vllm_config, model_config=built.draft_model_config
            )
    return built


def load_distinct_experts(built: BuiltModels, spec: ModelSpec, seed: int) -> dict:
    """Feed each model's own ``load_weights`` a distinct tensor per expert.

    Returns ``{id(model): {(layer_index, expert): digest of down_proj}}``
    (layer_index counts MoE layers), to check the loader wrote our values.
    """
    dtype = getattr(torch, spec.config["torch_dtype"])
    fed: dict[int, dict[tuple[int, int], int]] = {}
    jobs = [(built.model, moe_layer_ids(spec))]
    if built.drafter is not None:
        # DeepSeek's MTP layers follow the decoder layers in the checkpoint.
        jobs.append((built.drafter, [spec.config["num_hidden_layers"]]))
    down = spec.expert_names[2]
    for model, layers in jobs:
        entries = list(expert_checkpoint(spec, layers, dtype, seed=seed))
        model.load_weights(iter(entries))
        digests = {}
        for key, value in entries:
            if key.endswith(f".{down}.weight"):
                parts = key.split(".")
                layer = layers.index(int(parts[2]))
                expert = int(parts[-3])
                digests[(layer, expert)] = _digest(value)
        fed[id(model)] = digests
    return fed
