"""The "min_migration" placement policy: repair the old placement, move little.

The default policy re-packs every layer from scratch, so after a small drift in
load nearly every rank gets new experts and nearly all expert bytes move. This
policy starts from the old placement instead and repairs it per layer. The
target is the lowest peak rank load the fresh replica counts allow on the new
weights (``_goal``: the balanced policy packs close to it, and the bound costs
no packing), loosened by ``tolerance`` in balancedness (mean / max load per
rank) but never above the default policy's peak, so a repaired layer is never
less balanced than vLLM's placement. The repair first gives each expert the
fresh replica count where needed (surplus replicas leave the fullest ranks,
missing ones fill the freed slots of the lightest), then swaps replicas out of
every rank above the target, choosing among the swaps that fix a rank the one
that makes the fewest experts new to a rank, and staying on the node where it
can, so a hierarchical placement mostly stays hierarchical (not strictly). A
layer whose repair cannot reach the target falls back to the balanced packing,
relabelled onto ranks (and nodes) to keep as many experts in place as
possible.

Kept experts never change local slot, so a rank copies nothing in place for
them. The kernels run under numba when it is importable and as plain Python
otherwise (same code, slower: see ``benchmarks/eplb/bench_policy.py``).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from .balanced import rebalance_balanced
from .default import (
    balanced_packing,
    preserve_rank_slots,
    rebalance_default,
    replicate_experts,
    replicate_hierarchical,
)
from .local_search import (
    HAS_NUMBA,
    _jit,
    best_swap,
    bin_loads,
    first_above,
    fullest_and_lightest,
)
from .quality import replica_counts
from .validation import uses_hierarchy

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TOLERANCE", "HAS_NUMBA", "rebalance_min_migration"]

# Balancedness a repaired layer may give up against the best its replica
# counts allow (``_goal``'s bound; never below the default's: the target is
# capped at the default's peak). Measured on ``bench_policy.py``'s rows: the
# DeepSeek-V3 rows (5% drift) are capped at the default's peak from 0.02 up;
# on the ESFT whole-task rows (a large drift) the worst row moves 33% of what
# the default moves at 0.02, 27% at 0.03, 21% at 0.04 and 16% at 0.05, each
# still at or above the default's balance.
DEFAULT_TOLERANCE = 0.04
# Extra cost, in experts made new, of a swap that crosses nodes (slower links).
_NODE_PENALTY = 0.25
# Most swaps per layer, per slot of the layer.
_SWAPS_PER_SLOT = 1


def rebalance_min_migration(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_phy2log: np.ndarray | None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> np.ndarray:
    """Placement ``[L, num_replicas]`` within ``tolerance`` of the best
    balance its replica counts allow (never below the default's), moving
    little.

    Without a usable ``old_phy2log`` this is exactly the balanced policy.
    """
    if old_phy2log is None or np.shape(old_phy2log) != (
        np.shape(weight)[0],
        num_replicas,
    ):
        return rebalance_balanced(
            weight, num_replicas, num_groups, num_nodes, num_ranks, None
        )
    old = np.ascontiguousarray(old_phy2log, dtype=np.int64)
    load = np.ascontiguousarray(weight, dtype=np.float64)
    goal = _goal(weight, num_replicas, num_groups, num_nodes, num_ranks)
    mean_load = load.sum(axis=1) / num_ranks
    best_balance = mean_load / np.maximum(goal.bound_peak, 1e-300)
    targets = np.minimum(
        mean_load / np.maximum(best_balance - tolerance, 1e-9), goal.default_peak
    )
    goal_order = np.argsort(load / goal.counts, axis=1)
    hierarchical = goal.home is not None
    ranks_per_node = num_ranks // num_nodes
    home = goal.home if hierarchical else np.full(load.shape, -1, dtype=np.int64)
    out = np.empty_like(old)
    reached = np.empty(load.shape[0], dtype=np.bool_)
    _repair_rows(
        load,
        old,
        num_ranks,
        ranks_per_node,
        targets,
        goal.default_peak,
        goal.counts,
        home,
        goal_order,
        _SWAPS_PER_SLOT * num_replicas,
        out,
        reached,
    )
    fallbacks = np.flatnonzero(~reached)
    if fallbacks.size:
        fresh = rebalance_balanced(
            weight[fallbacks], num_replicas, num_groups, num_nodes, num_ranks
        )
        for row, layer in zip(fresh, fallbacks, strict=True):
            out[layer] = _relabel_onto_old(
                row,
                old[layer],
                num_ranks,
                ranks_per_node if hierarchical else num_ranks,
            )
    if fallbacks.size:
        logger.debug(
            "min_migration: %d of %d layers fell back to the relabelled fresh packing",
            fallbacks.size,
            load.shape[0],
        )
    # Moves can leave a kept expert in another local slot of its rank.
    return preserve_rank_slots(out, old, num_ranks)


class _Goal(NamedTuple):
    """What the repair aims at, per layer, from the fresh replica counts."""

    counts: np.ndarray  # [L, E] int64: replicas of each expert
    bound_peak: np.ndarray  # [L]: no packing of these counts has a lower peak
    default_peak: np.ndarray  # [L]: the default policy's peak
    home: np.ndarray | None  # [L, E]: each expert's node; None: global


def _goal(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
) -> _Goal:
    """The default policy's replica counts (its groups' nodes when
    hierarchical), its peak, and the lowest peak these counts allow: per
    node, ``max(node load / its ranks, largest replica)``. The balanced
    policy packs close to that bound, so the bound stands in for it without
    packing anything."""
    num_layers, num_experts = weight.shape
    if not (num_nodes > 1 and uses_hierarchy(num_groups, num_nodes)):
        phy2log, counts = replicate_experts(weight, num_replicas)
        replica_load = np.take_along_axis(weight / counts, phy2log, axis=1)
        bound, default = _peaks(replica_load, num_ranks)
        return _Goal(counts, bound, default, None)
    replicas = replicate_hierarchical(weight, num_replicas, num_groups, num_nodes)
    bound, default = _peaks(replicas.replica_load, num_ranks // num_nodes)
    # Logical id of each replica: node-local mlog id -> mlog id -> logical.
    experts_per_node = num_experts // num_nodes
    mlog = (
        replicas.phy2mlog
        + ((np.arange(num_layers * num_nodes) % num_nodes) * experts_per_node)[:, None]
    )
    logical = np.take_along_axis(
        replicas.mlog2log, mlog.reshape(num_layers, num_replicas), axis=1
    )
    home = np.empty_like(replicas.mlog2log)
    np.put_along_axis(
        home,
        replicas.mlog2log,
        np.broadcast_to(np.arange(num_experts) // experts_per_node, home.shape),
        axis=1,
    )
    return _Goal(
        replica_counts(logical, num_experts),
        bound.reshape(num_layers, num_nodes).max(axis=1),
        default.reshape(num_layers, num_nodes).max(axis=1),
        home,
    )


def _peaks(replica_load: np.ndarray, num_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of replicas packed onto ``num_ranks`` ranks: the lowest peak
    any packing can have, ``max(load / ranks, largest replica)``, and the
    default policy's (greedy) peak."""
    greedy, _ = balanced_packing(
        replica_load, num_ranks, order=np.argsort(-replica_load, axis=-1)
    )
    default = bin_loads(replica_load, greedy, num_ranks).max(axis=1)
    bound = np.maximum(replica_load.sum(axis=1) / num_ranks, replica_load.max(axis=1))
    return bound, default


def warm_up_kernels() -> None:
    """Compile the repair and the fallback kernels on a tiny drifted input."""
    load = np.linspace(1.0, 4.0, 16, dtype=np.float32).reshape(1, 16)
    old = rebalance_default(load[:, ::-1].copy(), 24, 4, 2, 4)
    rebalance_min_migration(load, 24, 4, 2, 4, old)
    _relabel_onto_old(old[0], old[0][::-1].copy(), 4, 2)


# --------------------------------------------------------------------------
# Repair kernel (one layer)
# --------------------------------------------------------------------------


@_jit
def _holds(experts, first, last, expert):
    """How many of ``experts[first:last]`` are ``expert``."""
    held = 0
    for i in range(first, last):
        if experts[i] == expert:
            held += 1
    return held


@_jit
def _has(bits, rank, expert):
    """Whether bitset row ``rank`` (64 experts per int64 word) has ``expert``."""
    return (bits[rank, expert >> 6] >> (expert & 63)) & 1 == 1


@_jit
def _set(bits, rank, expert, value):
    mask = np.int64(1) << (expert & 63)
    if value:
        bits[rank, expert >> 6] |= mask
    else:
        bits[rank, expert >> 6] &= ~mask


@_jit
def _newness_change(was_on, now_on, held_now, rank, per_rank, placed, removed):
    """Change in experts new to ``rank`` when one of its replicas goes
    ``removed -> placed`` (bitsets of experts on each rank before the
    rebalance and now; ``held_now`` lists each rank's experts now)."""
    change = 0
    if not _has(was_on, rank, placed) and not _has(now_on, rank, placed):
        change += 1
    if not _has(was_on, rank, removed):
        first = rank * per_rank
        if _holds(held_now, first, first + per_rank, removed) == 1:
            change -= 1
    return change


@_jit
def _needed_counts(weight, count, goal_count, target):
    """Counts that change as few experts as they can: an expert whose share
    exceeds ``target`` gets the fewest replicas that bring it under (at most
    its goal), taken from experts above their goal count, least harmed first."""
    needed = count.copy()
    extra = 0
    for expert in range(count.shape[0]):
        while needed[expert] < goal_count[expert] and (
            weight[expert] / needed[expert] > target
        ):
            needed[expert] += 1
            extra += 1
    for _ in range(extra):
        donor = -1
        for expert in range(count.shape[0]):
            if needed[expert] > goal_count[expert] and (
                donor < 0
                or weight[expert] / (needed[expert] - 1)
                < weight[donor] / (needed[donor] - 1)
            ):
                donor = expert
        needed[donor] -= 1
    return needed


@_jit
def _align_counts(weight, row, count, goal_count, rank_load, home, ranks_per_node):
    """Give every expert its goal count of replicas, in place.

    Surplus replicas leave the fullest ranks; the missing ones, heaviest
    share first, take the freed slot on the lightest rank (on the expert's
    ``home`` node when one is free there)."""
    num_slots = row.shape[0]
    slots_per_rank = num_slots // rank_load.shape[0]
    freed = np.empty(num_slots, np.int64)
    num_freed = 0
    for expert in range(count.shape[0]):
        for _ in range(count[expert] - goal_count[expert]):
            chosen = -1
            for slot in range(num_slots):
                if row[slot] == expert and (
                    chosen < 0
                    or rank_load[slot // slots_per_rank]
                    > rank_load[chosen // slots_per_rank]
                ):
                    chosen = slot
            rank_load[chosen // slots_per_rank] -= weight[expert] / count[expert]
            row[chosen] = -1
            freed[num_freed] = chosen
            num_freed += 1
    missing = np.empty(num_freed, np.int64)
    num_missing = 0
    for expert in range(count.shape[0]):
        for _ in range(goal_count[expert] - count[expert]):
            # Insertion by share, heaviest first.
            share = weight[expert] / goal_count[expert]
            j = num_missing
            while j > 0 and weight[missing[j - 1]] / goal_count[missing[j - 1]] < share:
                missing[j] = missing[j - 1]
                j -= 1
            missing[j] = expert
            num_missing += 1
    for i in range(num_missing):
        expert = missing[i]
        chosen = -1
        chosen_home = False
        for k in range(num_freed):
            slot = freed[k]
            if row[slot] >= 0:
                continue
            at_home = home[expert] == slot // slots_per_rank // ranks_per_node
            if (
                chosen < 0
                or (at_home and not chosen_home)
                or (
                    at_home == chosen_home
                    and rank_load[slot // slots_per_rank]
                    < rank_load[chosen // slots_per_rank]
                )
            ):
                chosen, chosen_home = slot, at_home
        row[chosen] = expert
        rank_load[chosen // slots_per_rank] += weight[expert] / goal_count[expert]
    count[:] = goal_count


@_jit
def _finishing_swap(
    item_load,
    sorted_load,
    ascending,
    members,
    rank_of,
    rank_load,
    row,
    held_now,
    was_on,
    now_on,
    hot,
    low,
    target,
    ranks_per_node,
):
    """The swap bringing ``hot`` and its partner both to ``target`` that makes
    fewest experts new to a rank (crossing nodes counts extra), then leaves
    the most room; ``(-1, -1)`` if none. Partners of an item of load ``a``
    weigh in ``[a - (target - lightest load), a - excess]``."""
    per_rank = members.shape[1]
    hot_node = hot // ranks_per_node
    excess = rank_load[hot] - target
    best_cost = np.inf
    best_margin = -1.0
    mine = -1
    theirs = -1
    for k in range(per_rank):
        item = members[hot, k]
        value = item_load[item]
        for p in range(
            first_above(sorted_load, value - (target - rank_load[low]) - 1e-300),
            sorted_load.shape[0],
        ):
            shift = value - sorted_load[p]
            if shift < excess:
                break
            other = ascending[p]
            rank = rank_of[other]
            room = target - rank_load[rank] - shift
            if rank == hot or room < 0.0:
                continue
            cost = _newness_change(
                was_on, now_on, held_now, rank, per_rank, row[item], row[other]
            ) + _newness_change(
                was_on, now_on, held_now, hot, per_rank, row[other], row[item]
            )
            if rank // ranks_per_node != hot_node:
                cost += _NODE_PENALTY
            margin = min(room, shift - excess)
            if cost < best_cost or (cost == best_cost and margin > best_margin):
                best_cost, best_margin = cost, margin
                mine, theirs = item, other
    return mine, theirs


@_jit
def _repair_rows(
    load,
    old,
    num_ranks,
    ranks_per_node,
    targets,
    default_peak,
    goal_counts,
    home,
    goal_order,
    max_swaps,
    out,
    reached,
):
    """Every layer in one compiled call: ``_repair_layer`` at the target,
    else at the default's peak; counts changed only where needed first, all
    of them if that fails. ``out`` and ``reached`` out."""
    for layer in range(load.shape[0]):
        for attempt in range(4):
            row, ok = _repair_layer(
                load[layer],
                old[layer],
                num_ranks,
                ranks_per_node,
                targets[layer] if attempt < 2 else default_peak[layer],
                goal_counts[layer],
                home[layer],
                goal_order[layer],
                max_swaps,
                attempt % 2 == 1,
            )
            out[layer] = row
            reached[layer] = ok
            if ok:
                break


@_jit
def _repair_layer(
    weight,
    old_row,
    num_ranks,
    ranks_per_node,
    target,
    goal_count,
    home,
    goal_order,
    max_swaps,
    full_counts,
):
    """Repair one layer; returns (row, whether its peak reached ``target``).

    Counts first go to ``goal_count`` (``full_counts``) or change only
    where an expert's share exceeds the target (``_needed_counts``). Then,
    while a rank is above the target, it swaps one replica with another
    rank: of the swaps that bring both to the target, the one making fewest
    experts new to a rank (then staying on its node, then leaving the most
    room); failing that, the swap that lowers the pair's peak most. Replica
    loads never change during the swaps, so the replicas are sorted by load
    once and a rank's partners are found by
    binary search.
    """
    num_slots = old_row.shape[0]
    num_experts = weight.shape[0]
    per_rank = num_slots // num_ranks
    row = old_row.copy()
    count = np.zeros(num_experts, np.int64)
    for slot in range(num_slots):
        count[row[slot]] += 1
    rank_load = np.zeros(num_ranks)
    for slot in range(num_slots):
        rank_load[slot // per_rank] += weight[row[slot]] / count[row[slot]]
    if not full_counts:
        goal_count = _needed_counts(weight, count, goal_count, target)
    _align_counts(weight, row, count, goal_count, rank_load, home, ranks_per_node)

    # Items are the slots' replicas; each moves with its expert and load.
    # held_now[rank * per_rank + k]: expert of the rank's k-th member.
    item_load = np.empty(num_slots)
    members = np.empty((num_ranks, per_rank), np.int64)
    held_now = row.copy()
    anywhere = np.full(num_slots, -1, np.int64)  # no item is pinned to a node
    rank_of = np.empty(num_slots, np.int64)
    position = np.empty(num_slots, np.int64)
    rank_load[:] = 0.0
    for slot in range(num_slots):
        rank = slot // per_rank
        item_load[slot] = weight[row[slot]] / count[row[slot]]
        members[rank, slot % per_rank] = slot
        rank_of[slot] = rank
        position[slot] = slot % per_rank
        rank_load[rank] += item_load[slot]
    # Slots by ascending load: experts by share, each expert's slots together.
    share = np.empty(num_experts)
    for expert in range(num_experts):
        share[expert] = weight[expert] / max(count[expert], 1)
    # ``goal_order`` sorts the goal counts' shares; counts that differ move
    # few experts, so an insertion sort finishes in near-linear time.
    share_order = goal_order.copy()
    for i in range(1, num_experts):
        expert = share_order[i]
        j = i
        while j > 0 and share[share_order[j - 1]] > share[expert]:
            share_order[j] = share_order[j - 1]
            j -= 1
        share_order[j] = expert
    start = np.zeros(num_experts + 1, np.int64)
    for slot in range(num_slots):
        start[row[slot] + 1] += 1
    for expert in range(num_experts):
        start[expert + 1] += start[expert]
    ascending = np.empty(num_slots, np.int64)
    for slot in range(num_slots):
        ascending[start[row[slot]]] = slot
        start[row[slot]] += 1
    by_share = np.empty(num_slots, np.int64)
    filled = 0
    for expert in share_order:
        for k in range(count[expert]):
            by_share[filled] = ascending[start[expert] - count[expert] + k]
            filled += 1
    ascending = by_share
    sorted_load = item_load[ascending]

    words = (num_experts + 63) // 64
    was_on = np.zeros((num_ranks, words), np.int64)
    now_on = np.zeros((num_ranks, words), np.int64)
    for slot in range(num_slots):
        _set(was_on, slot // per_rank, old_row[slot], True)
        _set(now_on, slot // per_rank, row[slot], True)

    for _ in range(max_swaps):
        hot, low = fullest_and_lightest(rank_load)
        hot_load = rank_load[hot]
        if hot_load <= target:
            break
        mine, theirs = _finishing_swap(
            item_load,
            sorted_load,
            ascending,
            members,
            rank_of,
            rank_load,
            row,
            held_now,
            was_on,
            now_on,
            hot,
            low,
            target,
            ranks_per_node,
        )
        if mine < 0:
            mine, theirs = best_swap(
                item_load,
                sorted_load,
                ascending,
                members,
                rank_of,
                rank_load,
                hot,
                low,
                anywhere,
                num_ranks,
            )
        if mine < 0:
            break
        rank = rank_of[theirs]
        shift = item_load[mine] - item_load[theirs]
        rank_load[hot] -= shift
        rank_load[rank] += shift
        held_now[hot * per_rank + position[mine]] = row[theirs]
        held_now[rank * per_rank + position[theirs]] = row[mine]
        members[hot, position[mine]] = theirs
        members[rank, position[theirs]] = mine
        rank_of[mine], rank_of[theirs] = rank, hot
        position[mine], position[theirs] = position[theirs], position[mine]
        for r, placed, removed in (
            (rank, row[mine], row[theirs]),
            (hot, row[theirs], row[mine]),
        ):
            _set(now_on, r, placed, True)
            first = r * per_rank
            if _holds(held_now, first, first + per_rank, removed) == 0:
                _set(now_on, r, removed, False)
    out = np.empty_like(row)
    for rank in range(num_ranks):
        for k in range(per_rank):
            out[rank * per_rank + k] = row[members[rank, k]]
    return out, rank_load.max() <= target


# --------------------------------------------------------------------------
# Fallback: the default's packs, relabelled to keep experts in place
# --------------------------------------------------------------------------


@_jit
def _min_cost_assignment(cost):
    """Square assignment minimising total cost (Hungarian method, O(n^3)).

    Returns ``match`` with ``match[row] = column``.
    """
    n = cost.shape[0]
    row_potential = np.zeros(n + 1)
    col_potential = np.zeros(n + 1)
    owner = np.zeros(n + 1, np.int64)  # owner[col] = row (1-based), 0 = free
    came_from = np.zeros(n + 1, np.int64)
    for start in range(1, n + 1):
        owner[0] = start
        col = 0
        slack = np.full(n + 1, np.inf)
        done = np.zeros(n + 1, np.bool_)
        while True:
            done[col] = True
            row = owner[col]
            step = np.inf
            next_col = 0
            for j in range(1, n + 1):
                if done[j]:
                    continue
                reduced = cost[row - 1, j - 1] - row_potential[row] - col_potential[j]
                if reduced < slack[j]:
                    slack[j] = reduced
                    came_from[j] = col
                if slack[j] < step:
                    step = slack[j]
                    next_col = j
            for j in range(n + 1):
                if done[j]:
                    row_potential[owner[j]] += step
                    col_potential[j] -= step
                else:
                    slack[j] -= step
            col = next_col
            if owner[col] == 0:
                break
        while col != 0:
            prev = came_from[col]
            owner[col] = owner[prev]
            col = prev
    match = np.empty(n, np.int64)
    for j in range(1, n + 1):
        match[owner[j] - 1] = j - 1
    return match


@_jit
def _overlap(new_row, old_row, num_ranks, num_experts):
    """``overlap[a, b]``: distinct experts new pack ``a`` shares with old rank ``b``."""
    slots_per_rank = new_row.shape[0] // num_ranks
    new_held = np.zeros((num_experts, num_ranks), np.bool_)
    old_held = np.zeros((num_experts, num_ranks), np.bool_)
    for slot in range(new_row.shape[0]):
        new_held[new_row[slot], slot // slots_per_rank] = True
        old_held[old_row[slot], slot // slots_per_rank] = True
    overlap = np.zeros((num_ranks, num_ranks))
    for expert in range(num_experts):
        old_ranks = np.nonzero(old_held[expert])[0]
        for a in np.nonzero(new_held[expert])[0]:
            for b in old_ranks:
                overlap[a, b] += 1.0
    return overlap


@_jit
def _relabel_onto_old(new_row, old_row, num_ranks, ranks_per_node):
    """Permute the packs of ``new_row`` over ranks (nodes first) to keep experts.

    Packs stay inside their node group so a hierarchical placement stays
    hierarchical. Slots inside a rank are ordered later.
    """
    num_slots = new_row.shape[0]
    slots_per_rank = num_slots // num_ranks
    num_nodes = num_ranks // ranks_per_node
    num_experts = max(new_row.max(), old_row.max()) + 1
    overlap = _overlap(new_row, old_row, num_ranks, num_experts)

    node_of_pack = np.arange(num_nodes)
    if num_nodes > 1:
        node_cost = np.zeros((num_nodes, num_nodes))
        for a in range(num_ranks):
            for b in range(num_ranks):
                node_cost[a // ranks_per_node, b // ranks_per_node] -= overlap[a, b]
        node_of_pack = _min_cost_assignment(node_cost)
    rank_of_pack = np.empty(num_ranks, np.int64)
    for node in range(num_nodes):
        target_node = node_of_pack[node]
        cost = np.empty((ranks_per_node, ranks_per_node))
        for i in range(ranks_per_node):
            for j in range(ranks_per_node):
                cost[i, j] = -overlap[
                    node * ranks_per_node + i, target_node * ranks_per_node + j
                ]
        match = _min_cost_assignment(cost)
        for i in range(ranks_per_node):
            rank_of_pack[node * ranks_per_node + i] = (
                target_node * ranks_per_node + match[i]
            )

    out = np.empty_like(new_row)
    for pack in range(num_ranks):
        rank = rank_of_pack[pack]
        out[rank * slots_per_rank : (rank + 1) * slots_per_rank] = new_row[
            pack * slots_per_rank : (pack + 1) * slots_per_rank
        ]
    return out
