"""Per-model EPLB state, its counters, and the checks a model must pass.

``EplbModelState`` keeps vLLM's attribute names (``physical_to_logical_map``,
...) for code that reads them; the checks refuse a model before anything is
allocated or any collective runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.distributed.async_eplb.load_stats import LoadWindow
from vllm.distributed.async_eplb.maps import ExpertMaps
from vllm.distributed.async_eplb.staging import RowLayout

__all__ = [
    "EplbCounters",
    "EplbModelState",
    "ExpertGeometryMismatch",
    "assert_confs_equal",
    "check_model",
    "check_registered_weights",
    "initial_row",
    "keep_recent",
]

# Timing samples kept in EplbCounters: the most recent ones, so that weeks of
# serving do not grow memory.
MAX_SAMPLES = 65536


@dataclass
class EplbCounters:
    """What happened so far on this rank; read by the simulator and benchmarks."""

    rebalances: int = 0
    skips: int = 0
    aborts: int = 0
    layers_committed: int = 0
    bytes_moved: int = 0
    staging_seconds: list[float] = field(default_factory=list)
    commit_seconds: list[float] = field(default_factory=list)
    last_abort_cause: str | None = None
    last_predicted: tuple[float, float] | None = None
    """(old, new) predicted balancedness of the last planned rebalance."""
    last_balancedness: float | None = None
    """Last logged balancedness (mean/max tokens per rank)."""
    worker_deaths: int = 0
    """Staging worker threads found dead (summed over the EP group)."""
    balancing_enabled: bool = True
    """False once rebalancing was turned off; serving goes on unbalanced."""
    disabled_cause: str | None = None


def keep_recent(samples: list[float], new: Sequence[float]) -> None:
    """Append ``new``; past ``MAX_SAMPLES``, drop the oldest half."""
    samples.extend(new)
    if len(samples) > MAX_SAMPLES:
        del samples[: len(samples) - MAX_SAMPLES // 2]


class EplbModelState:
    """One registered model: its maps, load window, staging buffer and worker.

    Where a rebalance of it stands (its plan, the layers still to commit) is
    the round's (``RebalanceRound.plans``, ``.pending``), not the model's."""

    def __init__(
        self,
        model: Any,
        model_name: str,
        maps: ExpertMaps,
        load_pass: torch.Tensor,
        window: LoadWindow,
        num_unpadded_tokens_tensors: list[torch.Tensor],
    ) -> None:
        self.model = model
        self.model_name = model_name
        self.maps = maps
        self.expert_load_pass = load_pass
        self.window = window
        self.num_unpadded_tokens_tensors = num_unpadded_tokens_tensors
        self.buffer: Any = None
        self.transport: Any = None
        self.worker: Any = None

    # vLLM's EplbModelState attribute names, for code that reads them.
    @property
    def physical_to_logical_map(self) -> torch.Tensor:
        return self.maps.phy2log

    @property
    def logical_to_physical_map(self) -> torch.Tensor:
        return self.maps.log2phy

    @property
    def logical_replica_count(self) -> torch.Tensor:
        return self.maps.logcnt


def initial_row(num_routed_experts: int, num_redundant_experts: int) -> list[int]:
    """vLLM's initial placement: experts in order, then redundant ``i % E``.

    vLLM's weight loader fills the physical slots by this rule, so the maps
    must start from it.
    """
    row = list(range(num_routed_experts))
    return row + [i % num_routed_experts for i in range(num_redundant_experts)]


def _initial_phy2log(model: Any) -> torch.Tensor:
    row = initial_row(model.num_routed_experts, model.num_redundant_experts)
    if len(row) != model.num_physical_experts or max(row) >= model.num_logical_experts:
        raise ValueError(
            f"model has {model.num_physical_experts} physical experts but "
            f"{model.num_routed_experts} routed + {model.num_redundant_experts} "
            "redundant"
        )
    return torch.tensor(row, dtype=torch.int64).expand(model.num_moe_layers, -1)


_GEOMETRY = (
    "num_routed_experts",
    "num_redundant_experts",
    "num_physical_experts",
    "num_logical_experts",
    "num_expert_groups",
)


class ExpertGeometryMismatch(RuntimeError, ValueError):
    """Two models of one ``EplbState`` differ in expert geometry.

    A ``RuntimeError`` as vLLM's ``assert_confs_equal`` raises, and a
    ``ValueError`` like every other refusal of ``add_model``.
    """


def assert_confs_equal(model: Any, new_model: Any) -> None:
    """vLLM's check: every model of one ``EplbState`` has the same experts."""
    differ = [
        f"{name} {getattr(new_model, name)} (registered: {getattr(model, name)})"
        for name in _GEOMETRY
        if getattr(model, name) != getattr(new_model, name)
    ]
    if differ:
        raise ExpertGeometryMismatch(
            f"{type(new_model).__name__} does not match the registered "
            f"{type(model).__name__}: " + ", ".join(differ)
        )


def check_model(
    model: Any,
    *,
    registered: Any | None,
    configured_redundant: int | None,
    num_ranks: int,
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Refuse a model EPLB cannot serve, touching nothing.

    Returns its initial ``phy2log`` and the expert weights that vLLM's
    ``MixtureOfExperts.set_eplb_state`` will collect: each MoE layer's
    ``get_expert_weights()``. vLLM's models have no ``expert_weights``
    before ``set_eplb_state``, so those are what can be checked first.
    ``registered`` is a model already registered (a drafter must match it).
    Every rank sees the same geometry, so all ranks refuse together, before
    the collective group creation.
    """
    num_layers = getattr(model, "num_moe_layers", 0)
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(
            f"model {type(model).__name__} has no MoE layers "
            f"(num_moe_layers={num_layers!r})"
        )
    if registered is not None:
        assert_confs_equal(registered, model)
    if configured_redundant is not None and (
        configured_redundant != model.num_redundant_experts
    ):
        raise ValueError(
            f"model has {model.num_redundant_experts} redundant experts, "
            f"eplb_config.num_redundant_experts is {configured_redundant}"
        )
    if model.num_physical_experts % num_ranks:
        raise ValueError(
            f"{model.num_physical_experts} physical experts are not divisible "
            f"by {num_ranks} EP ranks"
        )
    initial = _initial_phy2log(model)
    layers = getattr(model, "moe_layers", None)
    if layers is None or len(layers) != num_layers:
        found = "no moe_layers" if layers is None else f"{len(layers)} in moe_layers"
        raise ValueError(f"model has {num_layers} MoE layers but {found}")
    weights = [list(layer.get_expert_weights()) for layer in layers]
    _check_weight_layout(weights, model.num_physical_experts, num_ranks)
    return initial, weights


def check_registered_weights(
    model: Any, expected: Sequence[Sequence[torch.Tensor]]
) -> None:
    """After ``set_eplb_state``: ``model.expert_weights`` are the layers' own.

    EPLB moves experts by writing into these tensors, so they must be the
    storage the layers compute with, not copies.
    """
    found = getattr(model, "expert_weights", None)
    if found is None or len(found) != len(expected):
        count = "none" if found is None else len(found)
        raise ValueError(
            f"{type(model).__name__}.set_eplb_state() left expert weights for "
            f"{count} of {len(expected)} MoE layers"
        )
    for layer, (got, want) in enumerate(zip(found, expected, strict=True)):
        same = len(got) == len(want) and all(
            g.data_ptr() == w.data_ptr() and g.shape == w.shape
            for g, w in zip(got, want, strict=True)
        )
        if not same:
            raise ValueError(
                f"{type(model).__name__}.expert_weights[{layer}] are not the "
                "tensors its MoE layer's get_expert_weights() returns"
            )


def _check_weight_layout(
    weights: Sequence[Sequence[torch.Tensor]], num_physical: int, num_ranks: int
) -> None:
    """Every layer holds this rank's slots, with layer 0's shapes and dtypes."""
    local = num_physical // num_ranks
    layout = RowLayout.of(weights[0])
    for layer, layer_weights in enumerate(weights):
        if layer_weights[0].shape[0] != local:
            raise ValueError(
                f"layer {layer}'s expert weights hold "
                f"{layer_weights[0].shape[0]} slots, expected {local} "
                f"({num_physical} physical / {num_ranks} ranks)"
            )
        found_layout = RowLayout.of(layer_weights)
        if found_layout != layout:
            raise ValueError(
                f"layer {layer}'s expert weights (shapes {found_layout.shapes}, "
                f"dtypes {found_layout.dtypes}) differ from layer 0's "
                f"(shapes {layout.shapes}, dtypes {layout.dtypes})"
            )
