"""Quality metrics of an expert placement: balance and migration cost.

Pure numpy functions shared by the policies, their tests, the benchmarks, the
simulator and ``load_stats`` (the predicted gain of a rebalance), so that every
part scores a placement the same way. Tokens of a
logical expert are assumed to split evenly over its replicas (what the routers
do on average), so a slot holding expert ``e`` carries ``weight[e] / count[e]``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "balancedness",
    "balancedness_bound",
    "bytes_moved",
    "logged_balancedness",
    "mean_nodes_touched",
    "new_experts_per_rank",
    "peak_lower_bound",
    "rank_loads",
    "replica_counts",
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


def replica_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Replicas of each expert per layer, ``[L, num_experts]`` int64."""
    num_layers = phy2log.shape[0]
    flat = phy2log + (np.arange(num_layers) * num_experts)[:, None]
    return np.bincount(flat.ravel(), minlength=num_layers * num_experts).reshape(
        num_layers, num_experts
    )


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
    counts = replica_counts(placement, num_experts)
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


def logged_balancedness(weight: object, phy2log: object, num_ranks: int) -> float:
    """Balancedness as vLLM logs it: mean tokens per rank summed over layers,
    over the most loaded rank's tokens summed over layers."""
    loads = rank_loads(weight, phy2log, num_ranks)
    peak = float(loads.max(axis=-1).sum())
    return float(loads.mean(axis=-1).sum()) / peak if peak > 0 else 1.0


def peak_lower_bound(weight: object, num_replicas: int, num_ranks: int) -> np.ndarray:
    """Per layer, a load no placement's most loaded rank can be below.

    ``max(sum(w) / N, m*)``: the mean, and ``m*``, the smallest possible
    largest load of one replica, ``min max_e w_e / r_e`` over integer replica
    counts ``r_e >= 1`` summing to ``num_replicas``. Greedy replication (each
    extra replica to the expert of highest load per replica) attains ``m*``:
    the expert that sets the maximum at the end needs all its replicas.
    """
    load = _as_2d(weight, "weight").astype(np.float64)
    num_layers, num_experts = load.shape
    _slots_per_rank(num_replicas, num_ranks)
    if num_replicas < num_experts:
        raise ValueError(
            f"num_replicas={num_replicas} is fewer than {num_experts} experts"
        )
    count = np.ones((num_layers, num_experts), dtype=np.int64)
    rows = np.arange(num_layers)
    for _ in range(num_replicas - num_experts):
        top = np.argmax(load / count, axis=1)
        count[rows, top] += 1
    largest_share = (load / count).max(axis=1)
    return np.maximum(load.sum(axis=1) / num_ranks, largest_share)


def balancedness_bound(weight: object, num_replicas: int, num_ranks: int) -> float:
    """Upper bound on ``logged_balancedness`` of any placement of this load."""
    load = _as_2d(weight, "weight").astype(np.float64)
    peak = float(peak_lower_bound(load, num_replicas, num_ranks).sum())
    return float(load.sum() / num_ranks) / peak if peak > 0 else 1.0


def mean_nodes_touched(
    topk_ids: object, phy2log: object, num_ranks: int, num_nodes: int
) -> float:
    """Mean number of distinct nodes one token's experts are served from.

    ``topk_ids [T, k]``: the experts each token of one layer is routed to;
    ``phy2log [P]``: that layer's placement, ranks in node order. Each expert
    serves a token from one of its replicas chosen uniformly (what vLLM's
    replica choice does on average), so the expected count is, summed over
    nodes, ``1 - prod_j (1 - f_j)``, ``f_j`` being the fraction of expert
    ``j``'s replicas on that node.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    placement = np.asarray(phy2log, dtype=np.int64)
    if ids.ndim != 2 or placement.ndim != 1:
        raise ValueError(
            f"topk_ids must be [T, k] and phy2log [P], got {ids.shape} and "
            f"{placement.shape}"
        )
    if num_nodes <= 0 or num_ranks % num_nodes != 0:
        raise ValueError(f"num_nodes={num_nodes} does not divide num_ranks={num_ranks}")
    slots = _slots_per_rank(placement.shape[0], num_ranks)
    num_experts = int(placement.max()) + 1
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"topk_ids holds ids outside [0, {num_experts})")
    node_of_slot = np.arange(placement.shape[0]) // (slots * num_ranks // num_nodes)
    on_node = np.zeros((num_experts, num_nodes))
    np.add.at(on_node, (placement, node_of_slot), 1.0)
    fraction = on_node / on_node.sum(axis=1, keepdims=True)
    missed = np.prod(1.0 - fraction[ids], axis=1)  # [T, N]: node not touched
    return float((1.0 - missed).sum(axis=1).mean()) if ids.shape[0] else 0.0
