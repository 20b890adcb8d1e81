"""Local search on a packing: swap items to lower the fullest bin.

The slowest rank sets an MoE layer's step time. Greedy packing (heaviest
replica onto the lightest rank with room) leaves that rank well above the
mean whenever a rank holds three or more slots. Here, repeatedly, the fullest
bin ``h`` swaps one item with one item of another bin ``r``: the swap that
lowers ``max(L_h, L_r)`` the most. Each swap lowers the larger of the two
loads and raises neither above it, so the sorted vector of bin loads falls
lexicographically and the peak never rises: never worse than the start.

Item loads never change, only their bins, so the items are sorted by load
once; the partners worth trying for an item of load ``a`` are the items of
load in ``(a - gap, a)``, ``gap`` being the hot bin's lead over the lightest
bin, found by binary search. Near balance that window holds few items, so a
step costs far less than trying every pair.

``home[item]`` is the node an item must stay on (``-1``: anywhere; bin ``b``
is on node ``b // bins_per_node``): the "spill" policy pins each expert's
first replica to its group's node.

The kernels run compiled under numba when it is importable, else as plain
Python on the same code (same result, slower).
"""

from __future__ import annotations

import numpy as np

__all__ = ["HAS_NUMBA", "bin_loads", "improve_bins"]

# A swap must lower the pair's peak by more than this fraction of it, so float
# noise cannot make the search cycle.
_MIN_GAIN = 1e-9

try:
    import numba

    _jit = numba.njit(cache=True, nogil=True)
    HAS_NUMBA = True
except ImportError:  # the core runs on torch + numpy alone

    def _jit(func):
        return func

    HAS_NUMBA = False


def bin_loads(item_load: np.ndarray, bins: np.ndarray, num_bins: int) -> np.ndarray:
    """Sum of the items' loads per bin, ``[X, num_bins]`` float64."""
    num_rows = item_load.shape[0]
    flat = bins + (np.arange(num_rows) * num_bins)[:, None]
    return np.bincount(
        flat.ravel(),
        weights=np.asarray(item_load, dtype=np.float64).ravel(),
        minlength=num_rows * num_bins,
    ).reshape(num_rows, num_bins)


def improve_bins(
    item_load: np.ndarray,
    bins: np.ndarray,
    num_bins: int,
    *,
    home: np.ndarray | None = None,
    bins_per_node: int | None = None,
    max_swaps: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Swap items between bins while that lowers each row's fullest bin.

    Args:
        item_load: ``[X, n]`` load of each item (a replica's tokens), >= 0.
        bins: ``[X, n]`` start bin of each item, ``n / num_bins`` per bin.
        num_bins: bins per row (ranks).
        home: ``[X, n]`` node each item must stay on, ``-1`` for anywhere;
            None: no constraint. The start must respect it.
        bins_per_node: bins of one node; needed with ``home``.
        max_swaps: most swaps per row (default ``4 * n``).

    Returns:
        ``(bin, slot)``, both ``[X, n]`` int64: each item's bin and its
        position in the bin. As many items per bin as before; every row's
        fullest bin no fuller than at the start.
    """
    num_rows, num_items = bins.shape
    if num_bins <= 0 or num_items % num_bins != 0:
        raise ValueError(f"{num_items} items do not split into num_bins={num_bins}")
    if item_load.shape != bins.shape:
        raise ValueError(f"item_load {item_load.shape} and bins {bins.shape} differ")
    if bins.size and (bins.min() < 0 or bins.max() >= num_bins):
        raise ValueError(f"bins holds ids outside [0, {num_bins})")
    per_bin = num_items // num_bins
    flat = bins + (np.arange(num_rows) * num_bins)[:, None]
    if (np.bincount(flat.ravel(), minlength=num_rows * num_bins) != per_bin).any():
        raise ValueError(f"every bin must hold {per_bin} items")
    if home is None:
        pinned = np.full(bins.shape, -1, dtype=np.int64)
        per_node = num_bins
    else:
        pinned = np.ascontiguousarray(home, dtype=np.int64)
        if pinned.shape != bins.shape:
            raise ValueError(f"home has shape {pinned.shape}, expected {bins.shape}")
        if bins_per_node is None or bins_per_node <= 0 or num_bins % bins_per_node:
            raise ValueError(
                f"bins_per_node={bins_per_node} must divide num_bins={num_bins}"
            )
        per_node = bins_per_node
        if ((pinned >= 0) & (pinned != bins // per_node)).any():
            raise ValueError("the start places an item off its home node")
    load = np.ascontiguousarray(item_load, dtype=np.float64)
    ascending = np.ascontiguousarray(np.argsort(load, axis=1, kind="stable"))
    out_bin = np.ascontiguousarray(bins, dtype=np.int64).copy()
    out_slot = np.empty_like(out_bin)
    limit = 4 * num_items if max_swaps is None else int(max_swaps)
    _improve_rows(load, ascending, out_bin, out_slot, pinned, num_bins, per_node, limit)
    return out_bin, out_slot


@_jit
def _improve_rows(load, ascending, bins, slots, home, num_bins, bins_per_node, limit):
    per_bin = load.shape[1] // num_bins
    members = np.empty((num_bins, per_bin), np.int64)
    bin_load = np.empty(num_bins)
    for row in range(load.shape[0]):
        search_row(
            load[row],
            ascending[row],
            bins[row],
            slots[row],
            home[row],
            members,
            bin_load,
            bins_per_node,
            limit,
        )


@_jit
def search_row(
    load, ascending, bins, slots, home, members, bin_load, bins_per_node, limit
):
    """Search one row in place: ``bins`` in and out, ``slots`` out.

    ``ascending`` lists the items by load; ``members [B, n / B]`` and
    ``bin_load [B]`` are scratch. Returns the swaps made. Kernel-level (no
    checks): for the policies' fused kernels and ``improve_bins``.
    """
    num_bins = members.shape[0]
    num_items = load.shape[0]
    fill = np.zeros(num_bins, np.int64)
    bin_load[:] = 0.0
    for item in range(num_items):
        b = bins[item]
        members[b, fill[b]] = item
        slots[item] = fill[b]
        fill[b] += 1
        bin_load[b] += load[item]
    sorted_load = load[ascending]
    for swaps in range(limit):
        hot, low = fullest_and_lightest(bin_load)
        mine, theirs = best_swap(
            load,
            sorted_load,
            ascending,
            members,
            bins,
            bin_load,
            hot,
            low,
            home,
            bins_per_node,
        )
        if mine < 0:
            return swaps
        b = bins[theirs]
        shift = load[mine] - load[theirs]
        bin_load[hot] -= shift
        bin_load[b] += shift
        members[hot, slots[mine]] = theirs
        members[b, slots[theirs]] = mine
        bins[mine], bins[theirs] = b, hot
        slots[mine], slots[theirs] = slots[theirs], slots[mine]
    return limit


@_jit
def best_swap(
    load,
    sorted_load,
    ascending,
    members,
    bins,
    bin_load,
    hot,
    low,
    home,
    bins_per_node,
):
    """The swap of one item of bin ``hot`` with one of another bin that lowers
    the pair's larger load most, as ``(item, partner)``; ``(-1, -1)`` if none
    lowers it by more than ``_MIN_GAIN`` of it. ``low`` is the lightest bin
    (it bounds the useful partners); ``members [B, n / B]`` lists each bin's
    items, ``sorted_load`` is ``load[ascending]``; an item with ``home[item]
    >= 0`` stays on that node. Kernel-level."""
    hot_load = bin_load[hot]
    widest = hot_load - bin_load[low]
    hot_node = hot // bins_per_node
    best = _MIN_GAIN * hot_load
    mine = -1
    theirs = -1
    for k in range(members.shape[1]):
        item = members[hot, k]
        value = load[item]
        # Useful partners weigh in (value - widest + best, value - best).
        for p in range(first_above(sorted_load, value - widest + best), load.shape[0]):
            shift = value - sorted_load[p]
            if shift <= best:
                break
            other = ascending[p]
            b = bins[other]
            gain = min(shift, hot_load - bin_load[b] - shift)
            if gain <= best or b == hot:
                continue
            node = b // bins_per_node
            if node != hot_node and (
                (home[item] >= 0 and home[item] != node)
                or (home[other] >= 0 and home[other] != hot_node)
            ):
                continue
            best, mine, theirs = gain, item, other
    return mine, theirs


@_jit
def fullest_and_lightest(bin_load):
    """Indices of the fullest and the lightest bin (lowest index on ties)."""
    hot = 0
    low = 0
    for b in range(1, bin_load.shape[0]):
        if bin_load[b] > bin_load[hot]:
            hot = b
        if bin_load[b] < bin_load[low]:
            low = b
    return hot, low


@_jit
def first_above(sorted_load, floor):
    """First index of ``sorted_load`` (ascending) holding a value > ``floor``."""
    lo = 0
    hi = sorted_load.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_load[mid] <= floor:
            lo = mid + 1
        else:
            hi = mid
    return lo
