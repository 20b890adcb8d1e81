"""The "balanced" policies: vLLM's replica counts, a better packing of them.

``rebalance_balanced`` keeps the default policy's first two steps (expert
groups onto nodes when hierarchical; replica counts per node by greedy
replication, which already minimises the largest load of one replica) and
replaces its last one, the greedy packing of replicas onto ranks: balanced
differencing (``differencing``) then swaps from the most loaded rank
(``local_search``). Per node of each layer it keeps the greedy packing where
that is no worse, so no rank peak is ever above the default policy's.

``rebalance_spill`` is the hierarchical trade-off made optional: each
expert's first replica stays on its group's node (so a token's experts still
touch few nodes), while replica counts are chosen over the whole layer and
the redundant replicas may sit on any node.

Both take the validated arguments of ``rebalance_algo.PolicyFn``.
"""

from __future__ import annotations

import numpy as np

from .default import (
    balanced_packing,
    place_on_ranks,
    preserve_rank_slots,
    replicate_experts,
    replicate_hierarchical,
)
from .differencing import difference_row
from .local_search import _jit, improve_bins, search_row
from .validation import uses_hierarchy

__all__ = [
    "balanced_with_default_peak",
    "rebalance_balanced",
    "rebalance_spill",
    "warm_up_kernels",
]


def balanced_with_default_peak(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The balanced placement ``[L, P]`` and, per layer, the default policy's
    peak rank load on the same load (``[L]`` float64), at no extra cost."""
    if not uses_hierarchy(num_groups, num_nodes):
        num_groups = num_nodes = 1
    num_layers = weight.shape[0]
    replicas = replicate_hierarchical(weight, num_replicas, num_groups, num_nodes)
    ranks_per_node = num_ranks // num_nodes
    load = replicas.replica_load
    # The default's order (same expression), shared by all three packers.
    descending = np.argsort(-load, axis=-1)
    greedy, greedy_slot = balanced_packing(load, ranks_per_node, order=descending)
    bins = np.empty_like(greedy)
    slots = np.empty_like(greedy)
    greedy_peak = np.empty(load.shape[0])
    _balance_rows(
        np.ascontiguousarray(load, dtype=np.float64),
        np.ascontiguousarray(descending),
        np.ascontiguousarray(greedy),
        np.ascontiguousarray(greedy_slot),
        ranks_per_node,
        4 * load.shape[1],
        bins,
        slots,
        greedy_peak,
    )
    phy2log = place_on_ranks(replicas, bins, slots, num_ranks)
    default_peak = greedy_peak.reshape(num_layers, num_nodes).max(axis=1)
    return phy2log, default_peak


@_jit
def _balance_rows(
    load, descending, greedy, greedy_slot, num_bins, limit, bins, slots, greedy_peak
):
    """Per row: differencing, then local search; the greedy packing where
    that leaves the fullest bin lower. Also each row's greedy peak."""
    num_rows, num_items = load.shape
    per_bin = num_items // num_bins
    sums = np.empty((per_bin, num_bins))
    members = np.empty((num_bins, per_bin), np.int64)
    bin_load = np.empty(num_bins)
    ascending = np.empty(num_items, np.int64)
    home = np.full(num_items, -1, np.int64)
    for row in range(num_rows):
        for t in range(num_items):
            ascending[t] = descending[row, num_items - 1 - t]
        difference_row(load[row], descending[row], bins[row], sums)
        search_row(
            load[row],
            ascending,
            bins[row],
            slots[row],
            home,
            members,
            bin_load,
            num_bins,
            limit,
        )
        peak = bin_load.max()
        bin_load[:] = 0.0
        for item in range(num_items):
            bin_load[greedy[row, item]] += load[row, item]
        greedy_peak[row] = bin_load.max()
        if greedy_peak[row] <= peak:
            bins[row] = greedy[row]
            slots[row] = greedy_slot[row]


def rebalance_balanced(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_phy2log: np.ndarray | None = None,
) -> np.ndarray:
    """The "balanced" policy; given the old placement, experts that stay on
    a rank keep their slots. Returns ``phy2log [L, P]`` int64."""
    phy2log, _ = balanced_with_default_peak(
        weight, num_replicas, num_groups, num_nodes, num_ranks
    )
    if old_phy2log is not None:
        phy2log = preserve_rank_slots(phy2log, old_phy2log, num_ranks)
    return phy2log


def rebalance_spill(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_phy2log: np.ndarray | None = None,
) -> np.ndarray:
    """The "spill" policy: primaries with their group's node, redundant
    replicas anywhere. Where placement is not hierarchical (``num_nodes``
    does not divide ``num_groups``, or one node) this is "balanced"."""
    if num_nodes == 1 or not uses_hierarchy(num_groups, num_nodes):
        return rebalance_balanced(
            weight, num_replicas, num_groups, num_nodes, num_ranks, old_phy2log
        )
    num_experts = weight.shape[1]
    # Each expert's node, as the hierarchical policy packs groups onto nodes.
    mlog2log = replicate_hierarchical(
        weight, num_replicas, num_groups, num_nodes
    ).mlog2log
    node_of = np.empty_like(mlog2log)
    np.put_along_axis(
        node_of,
        mlog2log,
        np.broadcast_to(
            np.arange(num_experts) // (num_experts // num_nodes), mlog2log.shape
        ),
        axis=1,
    )
    # Replica counts over the whole layer; slot e < E is expert e's primary.
    replicas, count = replicate_experts(weight, num_replicas)
    load = np.take_along_axis(weight / count, replicas, axis=1)
    home = np.full(replicas.shape, -1, dtype=np.int64)
    home[:, :num_experts] = node_of
    ranks_per_node = num_ranks // num_nodes
    start = _pinned_greedy(
        np.ascontiguousarray(load, dtype=np.float64),
        np.ascontiguousarray(np.argsort(-load, axis=1, kind="stable")),
        home,
        num_ranks,
        ranks_per_node,
    )
    bins, within = improve_bins(
        load, start, num_ranks, home=home, bins_per_node=ranks_per_node
    )
    slot = bins * (num_replicas // num_ranks) + within
    phy2log = np.empty_like(replicas)
    np.put_along_axis(phy2log, slot, replicas, axis=1)
    if old_phy2log is not None:
        phy2log = preserve_rank_slots(phy2log, old_phy2log, num_ranks)
    return phy2log


@_jit
def _pinned_greedy(load, order, home, num_ranks, ranks_per_node):
    """Heaviest item first onto the lightest rank with room, a pinned item
    on its home node, a free one on a node keeping room for its pinned ones."""
    num_rows, num_items = load.shape
    per_rank = num_items // num_ranks
    num_nodes = num_ranks // ranks_per_node
    bins = np.empty((num_rows, num_items), np.int64)
    rank_load = np.empty(num_ranks)
    filled = np.empty(num_ranks, np.int64)
    room = np.empty(num_nodes, np.int64)  # free slots per node
    owed = np.empty(num_nodes, np.int64)  # pinned items still to place
    for row in range(num_rows):
        rank_load[:] = 0.0
        filled[:] = 0
        room[:] = ranks_per_node * per_rank
        owed[:] = 0
        for item in range(num_items):
            if home[row, item] >= 0:
                owed[home[row, item]] += 1
        for t in range(num_items):
            item = order[row, t]
            node = home[row, item]
            best = -1
            for rank in range(num_ranks):
                if filled[rank] == per_rank:
                    continue
                rank_node = rank // ranks_per_node
                if node >= 0:
                    if rank_node != node:
                        continue
                elif room[rank_node] <= owed[rank_node]:
                    continue
                if best < 0 or rank_load[rank] < rank_load[best]:
                    best = rank
            bins[row, item] = best
            filled[best] += 1
            rank_load[best] += load[row, item]
            room[best // ranks_per_node] -= 1
            if node >= 0:
                owed[node] -= 1
    return bins


def warm_up_kernels() -> None:
    """Compile the packing and search kernels on a tiny input."""
    load = np.linspace(1.0, 4.0, 16, dtype=np.float32).reshape(1, 16)
    rebalance_balanced(load, 24, 4, 2, 4)
    rebalance_spill(load, 24, 4, 2, 4)
