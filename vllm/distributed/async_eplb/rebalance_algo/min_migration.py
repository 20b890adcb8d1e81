"""The "min_migration" placement policy: repair the old placement, move little.

The default policy re-packs every layer from scratch, so after a small drift in
load nearly every rank gets new experts and nearly all expert bytes move. This
policy starts from the old placement instead and repairs it per layer: while the
hottest rank is above a target, it applies the one move (swap two slots, or
re-point one slot to another expert, which changes replica counts) that removes
the most load above the target per expert made new to a rank. The target is the
default policy's peak load on the new weights, loosened by ``tolerance`` in
balancedness (mean / max load per rank). When no single move helps, replica
counts are first moved to the default's counts (a transfer of replicas between
experts that single moves cannot make without passing through a worse state),
then the repair goes on. Moves across nodes score lower, so a hierarchical
placement mostly stays hierarchical (not strictly). A layer whose repair still
cannot reach the target falls back to the default's packing, relabelled onto
ranks (and nodes) to keep as many experts in place as possible.

Kept experts never change local slot, so a rank copies nothing in place for
them. The kernels run under numba when it is importable and as plain Python
otherwise (same code, slower: see ``benchmarks/eplb/bench_policy.py``).
"""

from __future__ import annotations

import logging

import numpy as np

from .default import preserve_rank_slots, rebalance_default
from .quality import rank_loads
from .validation import uses_hierarchy

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TOLERANCE", "rebalance_min_migration"]

# Balancedness a repaired layer may give up against the default policy. Measured
# (bench_policy.py, 5% drift): 0.002 moves 1.5-9% of what the default moves;
# 0.0 (never worse than the default) 2-10%, and takes ~20% longer.
DEFAULT_TOLERANCE = 0.002
# Score divisor of a move that makes no expert new: it still rewrites a slot.
_BASE_COST = 0.1
# Extra score divisor of a move that crosses nodes (slower links).
_NODE_PENALTY = 0.25

try:
    import numba

    _jit = numba.njit(cache=True, nogil=True)
    HAS_NUMBA = True
except ImportError:  # the core runs on torch + numpy alone

    def _jit(func):
        return func

    HAS_NUMBA = False


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
    """Placement ``[L, num_replicas]`` close to the default's balance, moving little.

    Without a usable ``old_phy2log`` this is exactly the default policy.
    """
    if old_phy2log is None or np.shape(old_phy2log) != (
        np.shape(weight)[0],
        num_replicas,
    ):
        return rebalance_default(
            weight, num_replicas, num_groups, num_nodes, num_ranks, None
        )
    old = np.ascontiguousarray(old_phy2log, dtype=np.int64)
    # The default's fresh packing sets the balance to reach and is the fallback.
    fresh = rebalance_default(weight, num_replicas, num_groups, num_nodes, num_ranks)
    load = np.ascontiguousarray(weight, dtype=np.float64)
    fresh_loads = rank_loads(load, fresh, num_ranks)
    mean_load = fresh_loads.mean(axis=1)
    fresh_balance = mean_load / np.maximum(fresh_loads.max(axis=1), 1e-300)
    targets = mean_load / np.maximum(fresh_balance - tolerance, 1e-9)
    goal_counts = np.zeros(load.shape, dtype=np.int64)
    np.add.at(goal_counts, (np.arange(load.shape[0])[:, None], fresh), 1)

    hierarchical = num_nodes > 1 and uses_hierarchy(num_groups, num_nodes)
    ranks_per_node = num_ranks // num_nodes
    out = np.empty_like(old)
    fallbacks = 0
    for layer in range(load.shape[0]):
        row, reached = _repair_layer(
            load[layer],
            old[layer],
            num_ranks,
            ranks_per_node,
            float(targets[layer]),
            goal_counts[layer],
            num_replicas,
        )
        if not reached:
            fallbacks += 1
            row = _relabel_onto_old(
                fresh[layer],
                old[layer],
                num_ranks,
                ranks_per_node if hierarchical else num_ranks,
            )
        out[layer] = row
    if fallbacks:
        logger.debug(
            "min_migration: %d of %d layers fell back to the relabelled default",
            fallbacks,
            load.shape[0],
        )
    # Moves can leave a kept expert in another local slot of its rank.
    return preserve_rank_slots(out, old, num_ranks)


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
def _excess(load: float, target: float) -> float:
    return load - target if load > target else 0.0


@_jit
def _newness_change(on_rank, was_on_rank, rank, placed, removed):
    """Change in experts new to ``rank`` when one slot goes ``removed -> placed``."""
    change = 0
    if on_rank[rank, placed] == 0 and not was_on_rank[rank, placed]:
        change += 1
    if on_rank[rank, removed] == 1 and not was_on_rank[rank, removed]:
        change -= 1
    return change


@_jit
def _move_cost(newness: int, crosses_node: bool) -> float:
    cost = _BASE_COST + (newness if newness > 0 else 0)
    if crosses_node:
        cost += _NODE_PENALTY
    return cost


@_jit
def _replace_gain(
    weight,
    row,
    count,
    holders,
    load,
    delta,
    marked,
    touched,
    slots_per_rank,
    target,
    slot,
    expert,
):
    """Load above target removed by re-pointing ``slot`` to ``expert``."""
    old_expert = row[slot]
    count_old = count[old_expert]
    count_new = count[expert]
    w_old = weight[old_expert]
    w_new = weight[expert]
    num_touched = 0
    for k in range(count_old):
        holder = holders[old_expert, k]
        rank = holder // slots_per_rank
        if holder == slot:
            delta[rank] -= w_old / count_old
        else:
            delta[rank] += w_old / (count_old - 1) - w_old / count_old
        if not marked[rank]:
            marked[rank] = True
            touched[num_touched] = rank
            num_touched += 1
    for k in range(count_new):
        rank = holders[expert, k] // slots_per_rank
        delta[rank] -= w_new / count_new - w_new / (count_new + 1)
        if not marked[rank]:
            marked[rank] = True
            touched[num_touched] = rank
            num_touched += 1
    delta[slot // slots_per_rank] += w_new / (count_new + 1)
    gain = 0.0
    for k in range(num_touched):
        rank = touched[k]
        gain += _excess(load[rank], target) - _excess(load[rank] + delta[rank], target)
        delta[rank] = 0.0
        marked[rank] = False
    return gain


@_jit
def _giver_penalty(
    weight,
    giver,
    count,
    holders,
    load,
    delta,
    marked,
    touched,
    slots_per_rank,
    target,
    slot,
    hot,
):
    """Load pushed above target on the ranks (other than ``hot`` and the slot's)
    that keep ``giver`` when ``slot`` stops holding it."""
    giver_count = count[giver]
    rise = weight[giver] / (giver_count - 1) - weight[giver] / giver_count
    own_rank = slot // slots_per_rank
    num_touched = 0
    for k in range(giver_count):
        rank = holders[giver, k] // slots_per_rank
        if rank in (own_rank, hot):
            continue
        delta[rank] += rise
        if not marked[rank]:
            marked[rank] = True
            touched[num_touched] = rank
            num_touched += 1
    penalty = 0.0
    for k in range(num_touched):
        rank = touched[k]
        penalty += _excess(load[rank] + delta[rank], target) - _excess(
            load[rank], target
        )
        delta[rank] = 0.0
        marked[rank] = False
    return penalty


@_jit
def _shares_a_rank(on_rank, holders, count, giver, expert, slot, slots_per_rank, hot):
    """Whether a rank other than ``hot`` and the slot's holds both experts."""
    own_rank = slot // slots_per_rank
    for k in range(count[giver]):
        rank = holders[giver, k] // slots_per_rank
        if rank != own_rank and rank != hot and on_rank[rank, expert] > 0:
            return True
    return False


@_jit
def _forget_holder(holders, count, expert, slot):
    last = count[expert] - 1
    for k in range(last + 1):
        if holders[expert, k] == slot:
            holders[expert, k] = holders[expert, last]
            break
    count[expert] = last


@_jit
def _set_slot(
    row, count, holders, on_rank, on_node, slots_per_rank, ranks_per_node, slot, expert
):
    """Re-point ``slot`` to ``expert``, keeping every index in step."""
    old_expert = row[slot]
    rank = slot // slots_per_rank
    node = rank // ranks_per_node
    _forget_holder(holders, count, old_expert, slot)
    on_rank[rank, old_expert] -= 1
    on_node[node, old_expert] -= 1
    holders[expert, count[expert]] = slot
    count[expert] += 1
    on_rank[rank, expert] += 1
    on_node[node, expert] += 1
    row[slot] = expert


@_jit
def _fill_loads(
    weight, row, count, slots_per_rank, load, slot_load, share_up, dilution
):
    """Per-rank and per-slot load, and per expert the share one more replica
    would carry and how much each existing replica would shed."""
    load[:] = 0.0
    for slot in range(row.shape[0]):
        expert = row[slot]
        slot_load[slot] = weight[expert] / count[expert]
        load[slot // slots_per_rank] += slot_load[slot]
    for expert in range(count.shape[0]):
        share_up[expert] = weight[expert] / (count[expert] + 1)
        dilution[expert] = weight[expert] / count[expert] - share_up[expert]


@_jit
def _align_counts(
    weight,
    row,
    count,
    holders,
    load,
    slot_load,
    share_up,
    dilution,
    delta,
    marked,
    touched,
    on_rank,
    on_node,
    slots_per_rank,
    ranks_per_node,
    target,
    goal_count,
):
    """Move replicas from experts above ``goal_count`` to experts below it.

    Used when no single move helps: the default's counts are known to allow the
    target, and the greedy repair can then fix the packing. Each transfer takes
    the slot whose re-pointing leaves the least load above the target.
    """
    num_experts = count.shape[0]
    while True:
        best_gain = -np.inf
        best_slot = -1
        best_expert = -1
        for giver in range(num_experts):
            if count[giver] <= goal_count[giver]:
                continue
            for k in range(count[giver]):
                slot = holders[giver, k]
                for expert in range(num_experts):
                    if count[expert] >= goal_count[expert]:
                        continue
                    gain = _replace_gain(
                        weight,
                        row,
                        count,
                        holders,
                        load,
                        delta,
                        marked,
                        touched,
                        slots_per_rank,
                        target,
                        slot,
                        expert,
                    )
                    if gain > best_gain:
                        best_gain, best_slot, best_expert = gain, slot, expert
        if best_slot < 0:
            return
        _set_slot(
            row,
            count,
            holders,
            on_rank,
            on_node,
            slots_per_rank,
            ranks_per_node,
            best_slot,
            best_expert,
        )
        _fill_loads(
            weight, row, count, slots_per_rank, load, slot_load, share_up, dilution
        )


@_jit
def _repair_layer(
    weight, old_row, num_ranks, ranks_per_node, target, goal_count, max_moves
):
    """Greedy repair of one layer; returns (row, whether the target was reached)."""
    num_slots = old_row.shape[0]
    num_experts = weight.shape[0]
    slots_per_rank = num_slots // num_ranks
    num_nodes = num_ranks // ranks_per_node
    row = old_row.copy()
    max_count = num_slots - num_experts + 1
    count = np.zeros(num_experts, np.int64)
    holders = np.empty((num_experts, max_count + 1), np.int64)
    on_rank = np.zeros((num_ranks, num_experts), np.int64)
    was_on_rank = np.zeros((num_ranks, num_experts), np.bool_)
    on_node = np.zeros((num_nodes, num_experts), np.int64)
    for slot in range(num_slots):
        expert = row[slot]
        rank = slot // slots_per_rank
        holders[expert, count[expert]] = slot
        count[expert] += 1
        on_rank[rank, expert] += 1
        was_on_rank[rank, expert] = True
        on_node[rank // ranks_per_node, expert] += 1
    load = np.zeros(num_ranks)
    slot_load = np.zeros(num_slots)
    share_up = np.zeros(num_experts)
    dilution = np.zeros(num_experts)
    _fill_loads(weight, row, count, slots_per_rank, load, slot_load, share_up, dilution)
    delta = np.zeros(num_ranks)
    marked = np.zeros(num_ranks, np.bool_)
    touched = np.empty(2 * max_count + 2, np.int64)

    aligned = False
    for _ in range(max_moves):
        hot = int(np.argmax(load))
        hot_load = load[hot]
        if hot_load <= target:
            return row, True
        hot_node = hot // ranks_per_node
        hot_excess = hot_load - target
        # Load above target on other ranks: bounds what a move can gain there.
        other_excess = -hot_excess
        for rank in range(num_ranks):
            other_excess += _excess(load[rank], target)
        best_score = 0.0
        # kind 0: swap slots best_slot, best_other; 1: set best_slot to best_other
        best_kind = -1
        best_slot = -1
        best_other = -1

        # Swaps of a slot of the hot rank with a lighter slot elsewhere.
        for i in range(slots_per_rank):
            slot = hot * slots_per_rank + i
            mine = row[slot]
            mine_load = slot_load[slot]
            for other_slot in range(num_slots):
                shift = mine_load - slot_load[other_slot]
                if shift <= 0.0:
                    continue  # also skips the hot rank's own slots (shift 0)
                rank = other_slot // slots_per_rank
                if rank == hot:
                    continue
                gain = (
                    hot_excess
                    + _excess(load[rank], target)
                    - _excess(hot_load - shift, target)
                    - _excess(load[rank] + shift, target)
                )
                if gain <= best_score * _BASE_COST:
                    continue
                theirs = row[other_slot]
                newness = _newness_change(
                    on_rank, was_on_rank, hot, theirs, mine
                ) + _newness_change(on_rank, was_on_rank, rank, mine, theirs)
                score = gain / _move_cost(newness, rank // ranks_per_node != hot_node)
                if score > best_score:
                    best_score, best_kind = score, 0
                    best_slot, best_other = slot, other_slot

        # Re-point a slot of the hot rank (its expert keeps another replica).
        for i in range(slots_per_rank):
            slot = hot * slots_per_rank + i
            mine = row[slot]
            if count[mine] < 2 or (aligned and count[mine] <= goal_count[mine]):
                continue
            mine_count = count[mine]
            mine_share = weight[mine] / mine_count
            # What the hot rank sheds, before counting what it gains.
            shed = mine_share - (on_rank[hot, mine] - 1) * (
                weight[mine] / (mine_count - 1) - mine_share
            )
            # Upper bounds on a move's gain subtract this when the new expert
            # shares no rank with the old one (it then cannot offset it).
            penalty = _giver_penalty(
                weight,
                mine,
                count,
                holders,
                load,
                delta,
                marked,
                touched,
                slots_per_rank,
                target,
                slot,
                hot,
            )
            for expert in range(num_experts):
                if expert == mine or (aligned and count[expert] >= goal_count[expert]):
                    continue
                relief = (
                    shed - share_up[expert] - on_rank[hot, expert] * dilution[expert]
                )
                if relief <= 0.0:
                    continue
                newness = _newness_change(on_rank, was_on_rank, hot, expert, mine)
                cost = _move_cost(newness, on_node[hot_node, expert] == 0)
                bound = min(relief, hot_excess) + other_excess
                if bound <= best_score * cost:
                    continue
                if bound - penalty <= best_score * cost and not _shares_a_rank(
                    on_rank, holders, count, mine, expert, slot, slots_per_rank, hot
                ):
                    continue
                gain = _replace_gain(
                    weight,
                    row,
                    count,
                    holders,
                    load,
                    delta,
                    marked,
                    touched,
                    slots_per_rank,
                    target,
                    slot,
                    expert,
                )
                score = gain / cost
                if score > best_score:
                    best_score, best_kind = score, 1
                    best_slot, best_other = slot, expert

        # Re-point a slot elsewhere to one more replica of a hot rank's expert.
        for other_slot in range(num_slots):
            rank = other_slot // slots_per_rank
            if rank == hot:
                continue
            theirs = row[other_slot]
            if count[theirs] < 2 or (aligned and count[theirs] <= goal_count[theirs]):
                continue
            node = rank // ranks_per_node
            # This rank's load change, exact; the bound below uses it.
            theirs_share = slot_load[other_slot]
            rank_shift = (on_rank[rank, theirs] - 1) * (
                weight[theirs] / (count[theirs] - 1) - theirs_share
            ) - theirs_share
            penalty = -1.0  # computed when first needed
            for i in range(slots_per_rank):
                expert = row[hot * slots_per_rank + i]
                if expert == theirs or (
                    aligned and count[expert] >= goal_count[expert]
                ):
                    continue
                relief = on_rank[hot, expert] * dilution[expert]
                newness = _newness_change(on_rank, was_on_rank, rank, expert, theirs)
                cost = _move_cost(newness, on_node[node, expert] == 0)
                new_rank_load = (
                    load[rank]
                    + rank_shift
                    + share_up[expert]
                    - on_rank[rank, expert] * dilution[expert]
                )
                bound = (
                    min(relief, hot_excess)
                    + other_excess
                    - _excess(new_rank_load, target)
                )
                if bound <= best_score * cost:
                    continue
                if penalty < 0.0:
                    penalty = _giver_penalty(
                        weight,
                        theirs,
                        count,
                        holders,
                        load,
                        delta,
                        marked,
                        touched,
                        slots_per_rank,
                        target,
                        other_slot,
                        hot,
                    )
                if bound - penalty <= best_score * cost and not _shares_a_rank(
                    on_rank,
                    holders,
                    count,
                    theirs,
                    expert,
                    other_slot,
                    slots_per_rank,
                    hot,
                ):
                    continue
                gain = _replace_gain(
                    weight,
                    row,
                    count,
                    holders,
                    load,
                    delta,
                    marked,
                    touched,
                    slots_per_rank,
                    target,
                    other_slot,
                    expert,
                )
                score = gain / cost
                if score > best_score:
                    best_score, best_kind = score, 1
                    best_slot, best_other = other_slot, expert

        if best_kind < 0:
            if aligned:
                return row, False
            _align_counts(
                weight,
                row,
                count,
                holders,
                load,
                slot_load,
                share_up,
                dilution,
                delta,
                marked,
                touched,
                on_rank,
                on_node,
                slots_per_rank,
                ranks_per_node,
                target,
                goal_count,
            )
            aligned = True
            continue
        if best_kind == 0:
            mine = row[best_slot]
            theirs = row[best_other]
            _set_slot(
                row,
                count,
                holders,
                on_rank,
                on_node,
                slots_per_rank,
                ranks_per_node,
                best_slot,
                theirs,
            )
            _set_slot(
                row,
                count,
                holders,
                on_rank,
                on_node,
                slots_per_rank,
                ranks_per_node,
                best_other,
                mine,
            )
        else:
            _set_slot(
                row,
                count,
                holders,
                on_rank,
                on_node,
                slots_per_rank,
                ranks_per_node,
                best_slot,
                best_other,
            )
        _fill_loads(
            weight, row, count, slots_per_rank, load, slot_load, share_up, dilution
        )
    return row, load.max() <= target


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
