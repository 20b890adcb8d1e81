"""Argument checks shared by every placement policy.

Policies receive what ``validate_rebalance_args`` returns and can trust it:
load as a finite, non-negative float32 array ``[L, E]`` converted exactly as
vLLM converts it (``.float()``, then NumPy), counts that divide as the layout
needs, and the old placement as an int64 array ``[L, P]`` of valid ids.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

__all__ = ["RebalanceArgumentError", "uses_hierarchy", "validate_rebalance_args"]


class RebalanceArgumentError(ValueError, AssertionError):
    """A bad argument to a placement policy.

    Both a ``ValueError`` (our callers, and what the message promises) and an
    ``AssertionError`` (what vLLM's policy raises, and what vLLM's own tests
    and callers catch), so either style of caller handles it.
    """


def uses_hierarchy(num_groups: int, num_nodes: int) -> bool:
    """vLLM's rule: pack groups onto nodes first when groups split evenly."""
    return num_groups % num_nodes == 0


def validate_rebalance_args(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_phy2log: Any = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(load float32 [L, E], old placement int64 [L, P] or None)``.

    Raises :class:`RebalanceArgumentError` naming the first bad value.
    """
    counts = {
        "num_replicas": num_replicas,
        "num_groups": num_groups,
        "num_nodes": num_nodes,
        "num_ranks": num_ranks,
    }
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise RebalanceArgumentError(f"{name} must be an int, got {value!r}")
        if value <= 0:
            raise RebalanceArgumentError(f"{name} must be > 0, got {value}")
    load = _load_as_float32(weight)
    num_layers, num_logical = load.shape
    if num_replicas < num_logical:
        raise RebalanceArgumentError(
            f"num_replicas={num_replicas} is fewer than the {num_logical} "
            "logical experts"
        )
    if num_replicas % num_ranks != 0:
        raise RebalanceArgumentError(
            f"num_replicas={num_replicas} is not divisible by num_ranks={num_ranks}"
        )
    if num_ranks % num_nodes != 0:
        raise RebalanceArgumentError(
            f"num_ranks={num_ranks} is not divisible by num_nodes={num_nodes}"
        )
    if uses_hierarchy(num_groups, num_nodes) and num_logical % num_groups != 0:
        raise RebalanceArgumentError(
            f"num_groups={num_groups} does not divide the {num_logical} logical "
            "experts (needed by the hierarchical policy, chosen because "
            f"num_nodes={num_nodes} divides num_groups)"
        )
    _check_load_values(load)
    old = None
    if old_phy2log is not None:
        old = _old_placement(old_phy2log, (num_layers, num_replicas), num_logical)
    return load, old


def _load_as_float32(weight: Any) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        if weight.dtype == torch.bool or weight.is_complex():
            raise RebalanceArgumentError(
                f"weight must hold real load counts, got {weight.dtype}"
            )
        if weight.dim() != 2:
            raise RebalanceArgumentError(
                f"weight must have shape [L, E], got {tuple(weight.shape)}"
            )
        # Same conversion as vLLM (float32 first, then host), so rounding and
        # memory layout, and hence every later float result, are the same.
        array = weight.detach().float().cpu().numpy()
    elif isinstance(weight, np.ndarray):
        if weight.dtype.kind not in "iuf":
            raise RebalanceArgumentError(
                f"weight must hold real load counts, got {weight.dtype}"
            )
        if weight.ndim != 2:
            raise RebalanceArgumentError(
                f"weight must have shape [L, E], got {weight.shape}"
            )
        array = weight.astype(np.float32, copy=False)
    else:
        raise RebalanceArgumentError(
            f"weight must be a torch.Tensor or numpy.ndarray, got {type(weight)!r}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise RebalanceArgumentError(
            f"weight must have at least one layer and one expert, "
            f"got shape {array.shape}"
        )
    return array


def _check_load_values(load: np.ndarray) -> None:
    # NaN fails `>= 0`, so one mask catches NaN, inf and negatives; float32
    # overflow of a larger input dtype shows up here as inf.
    good = np.isfinite(load) & (load >= 0)
    if not good.all():
        layer, expert = (int(i) for i in np.argwhere(~good)[0])
        raise RebalanceArgumentError(
            f"weight[{layer}, {expert}] = {load[layer, expert]} (as float32) is "
            "not a finite, non-negative load"
        )


def _old_placement(
    old: Any, expected_shape: tuple[int, int], num_logical: int
) -> np.ndarray:
    if isinstance(old, torch.Tensor):
        if old.dtype.is_floating_point or old.is_complex() or old.dtype == torch.bool:
            raise RebalanceArgumentError(
                f"old_global_expert_indices must hold integer ids, got {old.dtype}"
            )
        array = old.detach().cpu().numpy()
    elif isinstance(old, np.ndarray):
        if old.dtype.kind not in "iu":
            raise RebalanceArgumentError(
                f"old_global_expert_indices must hold integer ids, got {old.dtype}"
            )
        array = old
    else:
        raise RebalanceArgumentError(
            "old_global_expert_indices must be a torch.Tensor or numpy.ndarray, "
            f"got {type(old)!r}"
        )
    if array.shape != expected_shape:
        raise RebalanceArgumentError(
            f"old_global_expert_indices has shape {tuple(array.shape)}, expected "
            f"{expected_shape} (layers, num_replicas)"
        )
    array = array.astype(np.int64, copy=False)
    bad = (array < 0) | (array >= num_logical)
    if bad.any():
        layer, slot = (int(i) for i in np.argwhere(bad)[0])
        raise RebalanceArgumentError(
            f"old_global_expert_indices[{layer}, {slot}] = {array[layer, slot]} "
            f"is not a logical expert id in [0, {num_logical})"
        )
    return array
