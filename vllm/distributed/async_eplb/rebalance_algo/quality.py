"""Quality metrics of an expert placement: balance and migration cost.

Pure numpy functions shared by the policies, their tests, the benchmarks and
the simulator, so that every part scores a placement the same way. Tokens of a
logical expert are assumed to split evenly over its replicas (what the routers
do on average), so a slot holding expert ``e`` carries ``weight[e] / count[e]``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "balancedness",
    "bytes_moved",
    "new_experts_per_rank",
    "rank_loads",
]


def _as_2d(array: object, name: str) -> np.ndarray:
    """View ``array`` (numpy or CPU torch tensor) as ``[L, X]``; 1-D means one layer."""
    out = np.asarray(array)
    if out.ndim == 1:
        out = out[None, :]
    if out.ndim != 2:
        raise ValueError(f"{name} must have shape [L, X] or [X], got {out.shape}")
    return out


def _slots_per_rank(num_physical: int, num_ranks: int) -> int:
    if num_ranks <= 0 or num_physical % num_ranks != 0:
        raise ValueError(
            f"{num_physical} physical slots are not divisible by num_ranks={num_ranks}"
        )
    return num_physical // num_ranks


def rank_loads(weight: object, phy2log: object, num_ranks: int) -> np.ndarray:
    """Tokens each rank serves, ``[L, num_ranks]`` float64."""
    load = _as_2d(weight, "weight").astype(np.float64)
    placement = _as_2d(phy2log, "phy2log").astype(np.int64)
    if load.shape[0] != placement.shape[0]:
        raise ValueError(
            f"weight has {load.shape[0]} layers but phy2log has {placement.shape[0]}"
        )
    num_layers, num_experts = load.shape
    slots = _slots_per_rank(placement.shape[1], num_ranks)
    if placement.size and (placement.min() < 0 or placement.max() >= num_experts):
        raise ValueError(f"phy2log holds ids outside [0, {num_experts})")
    rows = np.arange(num_layers)[:, None]
    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    np.add.at(counts, (rows, placement), 1)
    per_slot = load[rows, placement] / counts[rows, placement]
    return per_slot.reshape(num_layers, num_ranks, slots).sum(axis=-1)


def balancedness(weight: object, phy2log: object, num_ranks: int) -> np.ndarray:
    """Mean over max tokens per rank, per layer (1.0 = perfect; idle layers = 1.0)."""
    loads = rank_loads(weight, phy2log, num_ranks)
    peak = loads.max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = loads.mean(axis=-1) / peak
    return np.where(peak > 0, ratio, 1.0)


def new_experts_per_rank(
    old_phy2log: object, new_phy2log: object, num_ranks: int
) -> np.ndarray:
    """Distinct experts each rank holds after the change but not before, ``[L, R]``.

    This is what a rank must receive over the network: a new expert placed in
    two of its slots is received once and copied locally.
    """
    old = _as_2d(old_phy2log, "old_phy2log").astype(np.int64)
    new = _as_2d(new_phy2log, "new_phy2log").astype(np.int64)
    if old.shape != new.shape:
        raise ValueError(
            f"old_phy2log {old.shape} and new_phy2log {new.shape} differ in shape"
        )
    num_layers = old.shape[0]
    slots = _slots_per_rank(old.shape[1], num_ranks)
    num_ids = int(max(old.max(initial=0), new.max(initial=0))) + 1
    old_ranks = old.reshape(num_layers, num_ranks, slots)
    new_ranks = new.reshape(num_layers, num_ranks, slots)
    layer = np.arange(num_layers)[:, None, None]
    rank = np.arange(num_ranks)[None, :, None]
    held_before = np.zeros((num_layers, num_ranks, num_ids), dtype=bool)
    held_before[layer, rank, old_ranks] = True
    held_after = np.zeros_like(held_before)
    held_after[layer, rank, new_ranks] = True
    return (held_after & ~held_before).sum(axis=-1)


def bytes_moved(
    old_phy2log: object, new_phy2log: object, num_ranks: int, expert_bytes: int
) -> int:
    """Bytes all ranks receive, summed over layers, for experts of ``expert_bytes``."""
    if expert_bytes < 0:
        raise ValueError(f"expert_bytes must be >= 0, got {expert_bytes}")
    moved = new_experts_per_rank(old_phy2log, new_phy2log, num_ranks)
    return int(moved.sum()) * int(expert_bytes)
