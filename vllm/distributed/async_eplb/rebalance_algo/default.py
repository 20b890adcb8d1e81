"""The "default" policy: DeepSeek's hierarchical placement, all layers at once.

Its output is identical, value for value, to vLLM 0.32's
``DefaultEplbPolicy.rebalance_experts`` on every input that both accept, so
swapping balancers changes nothing but speed. Identity rests on three rules:

- the same float arithmetic: float32 load, float64 pack sums, and
  ``float32 load / int64 count`` computed in float64;
- the same visiting order: the descending order of the items comes from
  ``np.argsort(-w)`` (NumPy's unstable sort, whose order of equal values only
  NumPy reproduces), computed by NumPy on the same arrays;
- the same tie-breaking: every greedy choice takes the lowest index among equal
  candidates, as ``np.argmin`` / ``np.argmax`` do.

The greedy loops run either as numba kernels (one compiled loop over all rows,
a heap per row instead of a scan; compiled lazily on first use and cached on
disk with ``cache=True``; ``nogil`` so a background thread can run them) or,
without numba, as NumPy loops over items that are vectorised across rows.
Both give identical results.

Public helpers (stable names; other policies build on them):
``balanced_packing``, ``replicate_experts``, ``preserve_rank_slots``,
``replicate_hierarchical`` and ``place_on_ranks`` (the hierarchical policy's
steps before and after packing), ``rebalance_hierarchical`` and the policy
itself, ``rebalance_default``;
``warm_up_kernels`` compiles ahead of the first rebalance.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import numpy as np

from .validation import uses_hierarchy

__all__ = [
    "NodeReplicas",
    "balanced_packing",
    "groups_onto_nodes",
    "numba_available",
    "place_on_ranks",
    "preserve_rank_slots",
    "rebalance_default",
    "rebalance_hierarchical",
    "replicate_experts",
    "replicate_hierarchical",
    "warm_up_kernels",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Greedy kernels written in numba's subset of Python. They run compiled when
# numba is present; the NumPy paths below never call them.
# ---------------------------------------------------------------------------


def _pack_rows_kernel(
    order: np.ndarray, weight: np.ndarray, num_packs: int, items_per_pack: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of each row. The open packs sit in a min-heap keyed
    (load, pack index), so its root is the pack ``np.argmin`` would pick; a
    pack leaves the heap when full (vLLM sets its load to inf instead)."""
    num_rows, num_items = weight.shape
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    filled = np.empty(num_packs, dtype=np.int64)
    heap_load = np.empty(num_packs, dtype=np.float64)
    heap_pack = np.empty(num_packs, dtype=np.int64)
    for row in range(num_rows):
        for p in range(num_packs):
            filled[p] = 0
            heap_load[p] = 0.0  # equal loads in index order: a valid heap
            heap_pack[p] = p
        size = num_packs
        for t in range(num_items):
            item = order[row, t]
            pack = heap_pack[0]
            pack_index[row, item] = pack
            rank_in_pack[row, item] = filled[pack]
            filled[pack] += 1
            load = heap_load[0] + weight[row, item]
            if filled[pack] == items_per_pack:
                size -= 1
                load = heap_load[size]
                pack = heap_pack[size]
            # Sift (load, pack) down from the root.
            i = 0
            while True:
                child = 2 * i + 1
                if child >= size:
                    break
                child_load = heap_load[child]
                child_pack = heap_pack[child]
                if child + 1 < size:
                    right_load = heap_load[child + 1]
                    right_pack = heap_pack[child + 1]
                    if right_load < child_load or (
                        right_load == child_load and right_pack < child_pack
                    ):
                        child += 1
                        child_load = right_load
                        child_pack = right_pack
                if child_load < load or (child_load == load and child_pack < pack):
                    heap_load[i] = child_load
                    heap_pack[i] = child_pack
                    i = child
                else:
                    break
            heap_load[i] = load
            heap_pack[i] = pack
    return pack_index, rank_in_pack


def _replicate_rows_kernel(
    weight: np.ndarray, num_physical: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy replication of each row. The experts sit in a max-heap keyed
    (load per replica, lowest index first), so its root is the expert
    ``np.argmax`` would pick. ``weight`` is float64, so the division is
    float64 as in NumPy."""
    num_rows, num_logical = weight.shape
    phy2log = np.empty((num_rows, num_physical), dtype=np.int64)
    count = np.ones((num_rows, num_logical), dtype=np.int64)
    heap_share = np.empty(num_logical, dtype=np.float64)
    heap_expert = np.empty(num_logical, dtype=np.int64)
    num_parents = num_logical // 2
    for row in range(num_rows):
        for e in range(num_logical):
            phy2log[row, e] = e
            heap_share[e] = weight[row, e]
            heap_expert[e] = e
        # One sift-down loop serves both phases: first building the heap
        # (each parent, last to first), then after each extra replica
        # re-sifting the root with its reduced share.
        for step in range(num_parents + num_physical - num_logical):
            if step < num_parents:
                i = num_parents - 1 - step
                share = heap_share[i]
                expert = heap_expert[i]
            else:
                i = 0
                expert = heap_expert[0]
                phy2log[row, num_logical + step - num_parents] = expert
                count[row, expert] += 1
                share = weight[row, expert] / count[row, expert]
            while True:
                child = 2 * i + 1
                if child >= num_logical:
                    break
                child_share = heap_share[child]
                child_expert = heap_expert[child]
                if child + 1 < num_logical:
                    right_share = heap_share[child + 1]
                    right_expert = heap_expert[child + 1]
                    if right_share > child_share or (
                        right_share == child_share and right_expert < child_expert
                    ):
                        child += 1
                        child_share = right_share
                        child_expert = right_expert
                if child_share > share or (
                    child_share == share and child_expert < expert
                ):
                    heap_share[i] = child_share
                    heap_expert[i] = child_expert
                    i = child
                else:
                    break
            heap_share[i] = share
            heap_expert[i] = expert
    return phy2log, count


def _preserve_rows_kernel(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Per row (one rank of one layer): kept experts stay in their old slots,
    the others fill the free slots in order."""
    num_rows, num_slots = new.shape
    out = np.empty_like(new)
    used = np.empty(num_slots, dtype=np.bool_)
    kept = np.empty(num_slots, dtype=np.bool_)
    for row in range(num_rows):
        for s in range(num_slots):
            used[s] = False
            kept[s] = False
        for s in range(num_slots):
            for j in range(num_slots):
                if not used[j] and new[row, j] == old[row, s]:
                    used[j] = True
                    kept[s] = True
                    out[row, s] = old[row, s]
                    break
        j = 0
        for s in range(num_slots):
            if kept[s]:
                continue
            while used[j]:
                j += 1
            out[row, s] = new[row, j]
            j += 1
    return out


class _Kernels(NamedTuple):
    pack_rows: object
    replicate_rows: object
    preserve_rows: object


@functools.cache
def _numba_kernels() -> _Kernels | None:
    """Compile lazily (importing numba costs ~0.3 s); None without numba."""
    try:
        import numba
    except ImportError:
        logger.info("numba not found: the default policy runs its NumPy path")
        return None
    jit = numba.njit(cache=True, nogil=True)
    return _Kernels(
        jit(_pack_rows_kernel), jit(_replicate_rows_kernel), jit(_preserve_rows_kernel)
    )


def numba_available() -> bool:
    """Whether the compiled kernels can be used."""
    return _numba_kernels() is not None


def warm_up_kernels() -> bool:
    """Compile (or load from numba's on-disk cache) every kernel now, on a
    tiny input, so the first real rebalance does not pay for it. Returns
    whether numba is in use. Without a call, kernels compile on first use."""
    if not numba_available():
        return False
    load = np.arange(8, dtype=np.float32).reshape(1, 8)
    first = rebalance_default(load, 12, 4, 2, 4)
    rebalance_default(load, 12, 4, 2, 4, first[:, ::-1].copy())
    return True


def _kernels_for(use_numba: bool | None) -> _Kernels | None:
    if use_numba is False:
        return None
    kernels = _numba_kernels()
    if kernels is None and use_numba:
        raise ValueError("use_numba=True but numba is not installed")
    return kernels


# ---------------------------------------------------------------------------
# Public building blocks.
# ---------------------------------------------------------------------------


def balanced_packing(
    weight: np.ndarray,
    num_packs: int,
    *,
    use_numba: bool | None = None,
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pack the ``n`` items of each row into ``num_packs`` packs of ``n /
    num_packs`` items each, heaviest first, each into the lightest open pack.

    ``weight [X, n]`` (float32 or float64; pack loads are summed in float64).
    Returns ``(pack_index [X, n], rank_in_pack [X, n])``, both int64. With one
    item per pack, item ``i`` goes to pack ``i`` (vLLM's shortcut).
    ``use_numba``: None picks numba when installed; False forces NumPy.
    ``order``: ``np.argsort(-weight, axis=-1)`` if the caller has it already.
    """
    num_rows, num_items = weight.shape
    if num_items % num_packs != 0:
        raise ValueError(f"{num_items} items do not split into {num_packs} packs")
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_index = np.tile(np.arange(num_items, dtype=np.int64), (num_rows, 1))
        return pack_index, np.zeros_like(pack_index)
    if order is None:
        order = np.argsort(-weight, axis=-1)
    kernels = _kernels_for(use_numba)
    if kernels is not None:
        return kernels.pack_rows(
            order, weight.astype(np.float64, copy=False), num_packs, items_per_pack
        )
    return _pack_rows_numpy(order, weight, num_packs, items_per_pack)


def _pack_rows_numpy(
    order: np.ndarray, weight: np.ndarray, num_packs: int, items_per_pack: int
) -> tuple[np.ndarray, np.ndarray]:
    """One step per item rank, all rows at once; packs addressed by flat index
    (row * num_packs + pack) so each step is a few 1-D gathers and scatters."""
    num_rows, num_items = weight.shape
    first_pack = np.arange(num_rows) * num_packs
    load = np.zeros(num_rows * num_packs, dtype=np.float64)
    filled = np.zeros(num_rows * num_packs, dtype=np.int64)
    load_by_row = load.reshape(num_rows, num_packs)
    sorted_weight = np.take_along_axis(weight, order, axis=1)
    chosen = np.empty((num_rows, num_items), dtype=np.int64)
    rank = np.empty((num_rows, num_items), dtype=np.int64)
    for t in range(num_items):
        pack = first_pack + np.argmin(load_by_row, axis=1)  # full packs hold inf
        chosen[:, t] = pack
        rank[:, t] = filled[pack]
        filled[pack] += 1
        load[pack] = np.where(
            filled[pack] == items_per_pack, np.inf, load[pack] + sorted_weight[:, t]
        )
    rows = np.arange(num_rows)[:, None]
    pack_index = np.empty_like(chosen)
    rank_in_pack = np.empty_like(rank)
    pack_index[rows, order] = chosen - first_pack[:, None]
    rank_in_pack[rows, order] = rank
    return pack_index, rank_in_pack


def replicate_experts(
    weight: np.ndarray, num_physical: int, *, use_numba: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Give each row's ``E`` experts ``num_physical`` slots: one each, then
    every extra slot to the expert with the highest load per replica.

    ``weight [X, E]`` float32. Returns ``(phy2log [X, num_physical],
    count [X, E])``, int64; slot ``e < E`` holds expert ``e``.
    """
    num_rows, num_logical = weight.shape
    if num_physical < num_logical:
        raise ValueError(
            f"num_physical={num_physical} is fewer than {num_logical} experts"
        )
    kernels = _kernels_for(use_numba)
    if kernels is not None:
        # float64 first (exact), so the kernel divides in float64 as NumPy does.
        return kernels.replicate_rows(weight.astype(np.float64), num_physical)
    phy2log = np.empty((num_rows, num_physical), dtype=np.int64)
    phy2log[:, :num_logical] = np.arange(num_logical)
    count = np.ones((num_rows, num_logical), dtype=np.int64)
    # float32 / int64 is computed in float64, as vLLM computes it; only the
    # chosen expert's share changes per slot. Flat views: 1-D gathers/scatters.
    share = weight / count
    flat_weight, flat_count, flat_share = weight.ravel(), count.ravel(), share.ravel()
    first_expert = np.arange(num_rows) * num_logical
    for slot in range(num_logical, num_physical):
        top = np.argmax(share, axis=1)
        phy2log[:, slot] = top
        chosen = first_expert + top
        flat_count[chosen] += 1
        flat_share[chosen] = flat_weight[chosen] / flat_count[chosen]
    return phy2log, count


def preserve_rank_slots(
    phy2log: np.ndarray,
    old_phy2log: np.ndarray,
    num_ranks: int,
    *,
    use_numba: bool | None = None,
) -> np.ndarray:
    """Reorder each rank's slots so an expert it already held keeps its old
    slot (no local copy); experts new to the rank fill the free slots in order.

    Same result as vLLM's ``preserve_intragpu_slots``. Both placements are
    ``[L, P]`` int64 with ``P`` divisible by ``num_ranks``.
    """
    num_layers, num_physical = phy2log.shape
    slots_per_rank = num_physical // num_ranks
    new = phy2log.reshape(num_layers * num_ranks, slots_per_rank)
    old = old_phy2log.reshape(num_layers * num_ranks, slots_per_rank)
    kernels = _kernels_for(use_numba)
    if kernels is not None:
        out = kernels.preserve_rows(
            np.ascontiguousarray(new), np.ascontiguousarray(old)
        )
    else:
        out = _preserve_rows_numpy(new, old)
    return out.reshape(num_layers, num_physical)


def _preserve_rows_numpy(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    num_rows, num_slots = new.shape
    out = new.copy()
    used = np.zeros((num_rows, num_slots), dtype=bool)
    kept = np.zeros((num_rows, num_slots), dtype=bool)
    for s in range(num_slots):
        matches = (new == old[:, s, None]) & ~used
        rows = np.flatnonzero(matches.any(axis=1))
        first = np.argmax(matches[rows], axis=1)
        out[rows, s] = old[rows, s]
        used[rows, first] = True
        kept[rows, s] = True
    # The k-th unused new entry goes to the k-th slot not kept (a stable sort
    # lists the False positions first, in order); both counts are equal.
    source = np.argsort(used, axis=1, kind="stable")
    target = np.argsort(kept, axis=1, kind="stable")
    moving = np.arange(num_slots) < (num_slots - kept.sum(axis=1))[:, None]
    row_of = np.broadcast_to(np.arange(num_rows)[:, None], moving.shape)
    out[row_of[moving], target[moving]] = new[row_of[moving], source[moving]]
    return out


def _inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(perm)
    np.put_along_axis(
        inverse, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1
    )
    return inverse


class NodeReplicas(NamedTuple):
    """Steps 1-2 of the hierarchical policy: replicas by node, not yet on ranks.

    Node ``n`` owns the node-major ("mlog") expert ids ``[n * E / N, (n + 1) *
    E / N)``; its ``P / N`` replicas are row ``layer * N + n`` of ``phy2mlog``
    (node-local mlog ids) and ``replica_load`` (tokens each replica carries).
    """

    mlog2log: np.ndarray  # [L, E] logical id of each mlog id
    phy2mlog: np.ndarray  # [L * N, P / N] node-local mlog id of each replica
    replica_load: np.ndarray  # [L * N, P / N] float64


def groups_onto_nodes(
    weight: np.ndarray,
    num_groups: int,
    num_nodes: int,
    *,
    use_numba: bool | None = None,
) -> np.ndarray:
    """Step 1 of the hierarchical policy: pack expert groups onto nodes.

    Returns ``mlog2log [L, E]``: the logical id of each node-major ("mlog")
    id; node ``n`` owns mlog ids ``[n * E / N, (n + 1) * E / N)``.
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    if groups_per_node == 1:
        group_slot = np.broadcast_to(
            np.arange(num_groups, dtype=np.int64), (num_layers, num_groups)
        )
    else:
        # Summed exactly as vLLM sums (same expression, same array layout).
        with np.errstate(over="ignore"):  # reported just below
            group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=-1)
        if not np.isfinite(group_load).all():
            raise ValueError(
                "load of an expert group overflows float32; scale the load down"
            )
        node, rank_in_node = balanced_packing(
            group_load, num_nodes, use_numba=use_numba
        )
        group_slot = node * groups_per_node + rank_in_node
    log2mlog = (group_slot[:, :, None] * group_size + np.arange(group_size)).reshape(
        num_layers, num_logical
    )
    return _inverse_permutation(log2mlog)


def replicate_hierarchical(
    weight: np.ndarray,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    *,
    use_numba: bool | None = None,
) -> NodeReplicas:
    """Pack expert groups onto nodes, then replicate experts within each node.

    ``weight [L, E]`` float32, validated; ``num_groups = num_nodes = 1`` is the
    global policy's replication.
    """
    num_layers, num_logical = weight.shape
    # 1. Groups onto nodes, in node-major ("mlog") order of experts.
    mlog2log = groups_onto_nodes(weight, num_groups, num_nodes, use_numba=use_numba)
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(
        num_layers * num_nodes, num_logical // num_nodes
    )
    # 2. Replicas within each node.
    phy2mlog, mlog_count = replicate_experts(
        mlog_load, num_physical // num_nodes, use_numba=use_numba
    )
    replica_load = np.take_along_axis(mlog_load / mlog_count, phy2mlog, axis=1)
    return NodeReplicas(mlog2log, phy2mlog, replica_load)


def place_on_ranks(
    replicas: NodeReplicas,
    rank: np.ndarray,
    rank_slot: np.ndarray,
    num_ranks: int,
) -> np.ndarray:
    """``phy2log [L, P]`` from each replica's rank within its node
    (``rank [L * N, P / N]``) and slot within its rank (``rank_slot``)."""
    num_layers, num_logical = replicas.mlog2log.shape
    node_rows, physical_per_node = replicas.phy2mlog.shape
    num_nodes = node_rows // num_layers
    num_physical = physical_per_node * num_nodes
    slots_per_rank = num_physical // num_ranks
    logical_per_node = num_logical // num_nodes
    slot_of_replica = rank * slots_per_rank + rank_slot
    replica_of_slot = _inverse_permutation(slot_of_replica)
    slot_mlog = np.take_along_axis(replicas.phy2mlog, replica_of_slot, axis=1).reshape(
        num_layers, num_nodes, physical_per_node
    )
    slot_mlog = slot_mlog + (np.arange(num_nodes) * logical_per_node)[:, None]
    return np.take_along_axis(
        replicas.mlog2log, slot_mlog.reshape(num_layers, num_physical), axis=1
    )


def rebalance_hierarchical(
    weight: np.ndarray,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    *,
    use_numba: bool | None = None,
) -> np.ndarray:
    """DeepSeek's three steps, for all layers at once: pack expert groups onto
    nodes; replicate experts within each node; pack each node's replicas onto
    its ranks. ``num_groups = num_nodes = 1`` is the global policy.

    ``weight [L, E]`` float32, validated. Returns ``phy2log [L, num_physical]``.
    """
    replicas = replicate_hierarchical(
        weight, num_physical, num_groups, num_nodes, use_numba=use_numba
    )
    # 3. Each node's replicas onto its ranks.
    rank, rank_slot = balanced_packing(
        replicas.replica_load, num_ranks // num_nodes, use_numba=use_numba
    )
    return place_on_ranks(replicas, rank, rank_slot, num_ranks)


def rebalance_default(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_phy2log: np.ndarray | None = None,
    *,
    use_numba: bool | None = None,
) -> np.ndarray:
    """The "default" policy on validated inputs (see ``validation``):
    hierarchical when ``num_nodes`` divides ``num_groups``, else global; then,
    given the old placement, experts that stay on a rank keep their slots.

    Returns ``phy2log [L, num_replicas]`` int64.
    """
    if uses_hierarchy(num_groups, num_nodes):
        phy2log = rebalance_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_ranks, use_numba=use_numba
        )
    else:
        phy2log = rebalance_hierarchical(
            weight, num_replicas, 1, 1, num_ranks, use_numba=use_numba
        )
    if old_phy2log is not None:
        phy2log = preserve_rank_slots(
            phy2log, old_phy2log, num_ranks, use_numba=use_numba
        )
    return phy2log
