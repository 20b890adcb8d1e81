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
the redundant replicas may sit on any node: they are given to nodes first,
to even out the nodes' loads, then each node is packed onto its ranks.

Both take the validated arguments of ``rebalance_algo.PolicyFn``.
"""

from __future__ import annotations

import numpy as np

from .default import (
    balanced_packing,
    groups_onto_nodes,
    place_on_ranks,
    preserve_rank_slots,
    replicate_experts,
    replicate_hierarchical,
)
from .differencing import difference_row
from .local_search import _MIN_GAIN, _jit, search_row
from .validation import uses_hierarchy

__all__ = [
    "rebalance_balanced",
    "rebalance_spill",
    "warm_up_kernels",
]


@_jit
def _balance_rows(load, descending, greedy, greedy_slot, num_bins, limit, bins, slots):
    """Per row: differencing, then local search; the greedy packing where
    that leaves the fullest bin no higher."""
    num_rows, num_items = load.shape
    scratch = _row_scratch(num_items, num_bins)
    bin_load = scratch[3]
    for row in range(num_rows):
        _pack_row(load[row], descending[row], bins[row], slots[row], limit, scratch)
        peak = bin_load.max()
        bin_load[:] = 0.0
        for item in range(num_items):
            bin_load[greedy[row, item]] += load[row, item]
        if bin_load.max() <= peak:
            bins[row] = greedy[row]
            slots[row] = greedy_slot[row]


@_jit
def _pack_rows(load, descending, num_bins, limit, bins, slots):
    """Per row: differencing, then local search (no pinned items)."""
    num_rows, num_items = load.shape
    scratch = _row_scratch(num_items, num_bins)
    for row in range(num_rows):
        _pack_row(load[row], descending[row], bins[row], slots[row], limit, scratch)


@_jit
def _row_scratch(num_items, num_bins):
    """Work arrays of ``_pack_row``, allocated once per call."""
    per_bin = num_items // num_bins
    return (
        np.empty((per_bin, num_bins)),
        np.empty((num_bins, per_bin), np.int64),
        np.empty(num_items, np.int64),
        np.empty(num_bins),
        np.full(num_items, -1, np.int64),
    )


@_jit
def _pack_row(load, descending, bins, slots, limit, scratch):
    """One row: balanced differencing into ``bins``, then the local search
    (``bins`` and ``slots`` out; ``scratch[3]`` holds the bin loads after)."""
    sums, members, ascending, bin_load, home = scratch
    num_items = load.shape[0]
    for t in range(num_items):
        ascending[t] = descending[num_items - 1 - t]
    difference_row(load, descending, bins, sums)
    search_row(
        load,
        ascending,
        bins,
        slots,
        home,
        members,
        bin_load,
        members.shape[0],
        limit,
    )


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
    if not uses_hierarchy(num_groups, num_nodes):
        num_groups = num_nodes = 1
    replicas = replicate_hierarchical(weight, num_replicas, num_groups, num_nodes)
    ranks_per_node = num_ranks // num_nodes
    load = replicas.replica_load
    # The default's order (same expression), shared by both packers.
    descending = np.argsort(-load, axis=-1)
    greedy, greedy_slot = balanced_packing(load, ranks_per_node, order=descending)
    bins = np.empty_like(greedy)
    slots = np.empty_like(greedy)
    _balance_rows(
        np.ascontiguousarray(load, dtype=np.float64),
        np.ascontiguousarray(descending),
        np.ascontiguousarray(greedy),
        np.ascontiguousarray(greedy_slot),
        ranks_per_node,
        4 * load.shape[1],
        bins,
        slots,
    )
    phy2log = place_on_ranks(replicas, bins, slots, num_ranks)
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
    does not divide ``num_groups``, or one node) this is "balanced".

    Two levels: the redundant replicas go to nodes first (``_spill_to_nodes``:
    the nodes' totals set the busiest rank once each node is packed well),
    then each node's replicas are packed onto its ranks by differencing and
    local search."""
    if num_nodes == 1 or not uses_hierarchy(num_groups, num_nodes):
        return rebalance_balanced(
            weight, num_replicas, num_groups, num_nodes, num_ranks, old_phy2log
        )
    num_layers, num_experts = weight.shape
    # Each expert's node, as the hierarchical policy packs groups onto nodes.
    mlog2log = groups_onto_nodes(weight, num_groups, num_nodes)
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
    load = np.ascontiguousarray(
        np.take_along_axis(weight / count, replicas, axis=1), dtype=np.float64
    )
    home = np.full(replicas.shape, -1, dtype=np.int64)
    home[:, :num_experts] = node_of
    per_node = num_replicas // num_nodes
    node = _spill_to_nodes(
        load,
        np.ascontiguousarray(np.argsort(-load, axis=1, kind="stable")),
        home,
        num_nodes,
        per_node,
        4 * num_replicas,
    )
    # Each node's replicas, a row each, packed onto the node's ranks.
    by_node = np.argsort(node, axis=1, kind="stable").reshape(
        num_layers * num_nodes, per_node
    )
    node_load = np.take_along_axis(
        load, by_node.reshape(num_layers, num_replicas), axis=1
    ).reshape(num_layers * num_nodes, per_node)
    ranks_per_node = num_ranks // num_nodes
    bins = np.empty_like(by_node)
    within = np.empty_like(by_node)
    _pack_rows(
        node_load,
        np.ascontiguousarray(np.argsort(-node_load, axis=1)),
        ranks_per_node,
        4 * per_node,
        bins,
        within,
    )
    rank = bins + (np.arange(num_layers * num_nodes) % num_nodes)[:, None] * (
        ranks_per_node
    )
    slot = (rank * (num_replicas // num_ranks) + within).reshape(
        num_layers, num_replicas
    )
    phy2log = np.empty_like(replicas)
    np.put_along_axis(
        phy2log,
        slot,
        np.take_along_axis(replicas, by_node.reshape(num_layers, num_replicas), axis=1),
        axis=1,
    )
    if old_phy2log is not None:
        phy2log = preserve_rank_slots(phy2log, old_phy2log, num_ranks)
    return phy2log


@_jit
def _spill_to_nodes(load, descending, home, num_nodes, per_node, limit):
    """Node of each replica, ``per_node`` per node: a pinned replica on its
    ``home`` node; the free ones heaviest first onto the node of least load
    with room, then swapped between the busiest node and another while that
    lowers the pair's larger load (the search of ``local_search`` on nodes)."""
    num_rows, num_items = load.shape
    node = np.empty((num_rows, num_items), np.int64)
    node_load = np.empty(num_nodes)
    room = np.empty(num_nodes, np.int64)
    free = np.empty(num_items, np.int64)
    for row in range(num_rows):
        node_load[:] = 0.0
        room[:] = per_node
        num_free = 0
        for item in range(num_items):
            pinned = home[row, item]
            node[row, item] = pinned
            if pinned >= 0:
                node_load[pinned] += load[row, item]
                room[pinned] -= 1
        for t in range(num_items):
            item = descending[row, t]
            if home[row, item] >= 0:
                continue
            best = -1
            for n in range(num_nodes):
                if room[n] > 0 and (best < 0 or node_load[n] < node_load[best]):
                    best = n
            node[row, item] = best
            node_load[best] += load[row, item]
            room[best] -= 1
            free[num_free] = item
            num_free += 1
        for _ in range(limit):
            hot = 0
            for n in range(1, num_nodes):
                if node_load[n] > node_load[hot]:
                    hot = n
            best = _MIN_GAIN * node_load[hot]
            mine = -1
            theirs = -1
            for i in range(num_free):
                item = free[i]
                if node[row, item] != hot:
                    continue
                for j in range(num_free):
                    other = free[j]
                    shift = load[row, item] - load[row, other]
                    gain = min(
                        shift, node_load[hot] - node_load[node[row, other]] - shift
                    )
                    if gain > best:
                        best, mine, theirs = gain, item, other
            if mine < 0:
                break
            shift = load[row, mine] - load[row, theirs]
            node_load[hot] -= shift
            node_load[node[row, theirs]] += shift
            node[row, mine] = node[row, theirs]
            node[row, theirs] = hot
    return node


def warm_up_kernels() -> None:
    """Compile the packing and search kernels on a tiny input."""
    load = np.linspace(1.0, 4.0, 16, dtype=np.float32).reshape(1, 16)
    rebalance_balanced(load, 24, 4, 2, 4)
    rebalance_spill(load, 24, 4, 2, 4)
