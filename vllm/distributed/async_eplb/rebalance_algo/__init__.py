"""Expert placement policies: load statistics in, ``phy2log`` out.

``rebalance_experts`` has the signature of vLLM's
``DefaultEplbPolicy.rebalance_experts`` plus a ``policy`` keyword. It validates
the arguments once (``validation``), then runs the chosen policy on NumPy
arrays, every layer in one call.

Policies (``POLICIES``, the one list of names):
- ``"default"``: vLLM's placement, identical output, ~10x+ faster (``default``);
- ``"balanced"``: vLLM's replica counts, packed by balanced differencing and
  local search: a lower peak rank load wherever a rank holds three or more
  slots, never a higher one (``balanced``);
- ``"balanced_spill"``: hierarchical placements only: each expert's first
  replica stays with its group's node, the redundant ones may go to any node
  (``balanced``; elsewhere the same as ``"balanced"``);
- ``"min_migration"``: starts from the old placement and moves as few experts
  as it can, to within a tolerance of the best balance the fresh replica
  counts allow, never below the default's (``min_migration``).

Policy modules other than ``default`` are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
import torch

from .default import rebalance_default, warm_up_kernels
from .validation import RebalanceArgumentError, validate_rebalance_args

__all__ = [
    "POLICIES",
    "PolicyFn",
    "RebalanceArgumentError",
    "rebalance_experts",
    "warm_up",
]

PolicyFn = Callable[[np.ndarray, int, int, int, int, "np.ndarray | None"], np.ndarray]
"""``(load float32 [L, E], num_replicas, num_groups, num_nodes, num_ranks,
old phy2log int64 [L, P] or None) -> phy2log int64 [L, P]``, inputs validated."""


def _lazy(module: str, function: str) -> PolicyFn:
    """A policy imported at its first call (numba compiles on import)."""

    def policy(
        weight: np.ndarray,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_phy2log: np.ndarray | None,
    ) -> np.ndarray:
        found = getattr(importlib.import_module(module, __name__), function)
        return found(
            weight, num_replicas, num_groups, num_nodes, num_ranks, old_phy2log
        )

    return policy


POLICIES: Mapping[str, PolicyFn] = MappingProxyType(
    {
        "default": rebalance_default,
        "balanced": _lazy(".balanced", "rebalance_balanced"),
        "balanced_spill": _lazy(".balanced", "rebalance_spill"),
        "min_migration": _lazy(".min_migration", "rebalance_min_migration"),
    }
)


def rebalance_experts(
    weight: torch.Tensor | np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: torch.Tensor | np.ndarray | None = None,
    *,
    policy: str = "default",
) -> torch.Tensor:
    """Place ``num_replicas`` physical experts for every layer.

    Args:
        weight: ``[L, E]`` load per logical expert (any device, float or int).
        num_replicas: physical slots per layer, a multiple of ``num_ranks``.
        num_groups: expert groups (DeepSeek's node-limited routing groups).
        num_nodes: nodes; when it divides ``num_groups`` groups are packed
            onto nodes first (hierarchical), else placement is global.
        num_ranks: EP ranks, a multiple of ``num_nodes``.
        old_global_expert_indices: current ``phy2log [L, num_replicas]``.
        policy: a key of ``POLICIES``.

    Returns:
        ``phy2log [L, num_replicas]``, int64, on CPU.

    Raises:
        RebalanceArgumentError: (a ``ValueError`` and an ``AssertionError``)
            naming the bad argument or value.
    """
    chosen = POLICIES.get(policy) if isinstance(policy, str) else None
    if chosen is None:
        raise ValueError(
            f"unknown policy {policy!r}; valid policies: {sorted(POLICIES)}"
        )
    load, old = validate_rebalance_args(
        weight,
        num_replicas,
        num_groups,
        num_nodes,
        num_ranks,
        old_global_expert_indices,
    )
    phy2log = chosen(load, num_replicas, num_groups, num_nodes, num_ranks, old)
    expected = (load.shape[0], num_replicas)
    if phy2log.shape != expected:
        raise RuntimeError(
            f"policy {policy!r} returned shape {phy2log.shape}, expected {expected}"
        )
    return torch.from_numpy(np.ascontiguousarray(phy2log, dtype=np.int64))


def warm_up(policy: str = "default") -> None:
    """Build ``policy``'s compiled (numba) kernels now, or load them from
    numba's disk cache, so that a server's first rebalance is not seconds late
    on a fresh install. A no-op without numba."""
    if policy not in POLICIES:
        raise ValueError(
            f"unknown policy {policy!r}; valid policies: {sorted(POLICIES)}"
        )
    warm_up_kernels()
    if policy != "default":
        from .balanced import warm_up_kernels as warm_up_balanced

        warm_up_balanced()
    if policy == "min_migration":
        from .min_migration import warm_up_kernels as warm_up_min_migration

        warm_up_min_migration()
