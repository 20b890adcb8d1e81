"""Balanced differencing: pack items into bins of equal item count.

With few items per bin (3-10 slots per rank), greedy packing leaves its last,
small items too little room to even out the bins. The balanced largest
differencing method (Karmarkar-Karp, for equal cardinalities) does better:
cut the sorted items into rounds of one item per bin, each a partial packing,
then repeatedly merge the two partial packings whose bins differ the most,
pairing the heaviest bin of one with the lightest of the other. Each merge
cancels the largest spreads first, so the result is usually far more even
than greedy's; ``local_search`` then polishes it.

The kernel runs compiled under numba when it is importable, else as plain
Python on the same code.
"""

from __future__ import annotations

import numpy as np

from .local_search import _jit

__all__ = ["differencing_packing"]


def differencing_packing(item_load: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin of each item, ``[X, n]`` int64, for rows ``item_load [X, n]``.

    Every bin of a row gets exactly ``n / num_bins`` items.
    """
    num_rows, num_items = item_load.shape
    if num_bins <= 0 or num_items % num_bins != 0:
        raise ValueError(f"{num_items} items do not split into {num_bins} bins")
    load = np.ascontiguousarray(item_load, dtype=np.float64)
    descending = np.ascontiguousarray(np.argsort(-load, axis=1, kind="stable"))
    bins = np.empty((num_rows, num_items), dtype=np.int64)
    _pack_rows(load, descending, num_bins, bins)
    return bins


@_jit
def _pack_rows(load, descending, num_bins, bins):
    sums = np.empty((load.shape[1] // num_bins, num_bins))
    for row in range(load.shape[0]):
        difference_row(load[row], descending[row], bins[row], sums)


@_jit
def difference_row(load, descending, bins, sums):
    """Pack one row into ``bins`` (out). ``descending`` lists the items by
    load, heaviest first; ``sums [n / B, B]`` is scratch. Kernel-level."""
    rounds, num_bins = sums.shape
    num_items = load.shape[0]
    # Partial packing p starts as round p (items t with t // B == p), its bin
    # t % B; its items form a linked list (head, follow) of ``size`` items.
    head = np.empty(rounds, np.int64)
    size = np.full(rounds, num_bins, np.int64)
    follow = np.empty(num_items, np.int64)
    spread = np.empty(rounds)
    relabel = np.empty(num_bins, np.int64)
    heavy_first = np.empty(num_bins, np.int64)
    light_first = np.empty(num_bins, np.int64)
    for t in range(num_items):
        item = descending[t]
        bins[item] = t % num_bins
        sums[t // num_bins, t % num_bins] = load[item]
        if t % num_bins == 0:
            head[t // num_bins] = item
        follow[item] = descending[t + 1] if (t + 1) % num_bins else -1
    for p in range(rounds):
        spread[p] = sums[p].max() - sums[p].min()
    for _ in range(rounds - 1):
        # The two live partial packings with the largest spread (dead: -1).
        first = -1
        second = -1
        for p in range(rounds):
            if spread[p] < 0.0:
                continue
            if first < 0 or spread[p] > spread[first]:
                second = first
                first = p
            elif second < 0 or spread[p] > spread[second]:
                second = p
        # Heaviest bin of one with the lightest of the other; the smaller
        # packing's items are relabelled onto the larger's bins.
        keep, gone = first, second
        if size[first] < size[second]:
            keep, gone = second, first
        _order_bins(sums[keep], heavy_first, keep == first)
        _order_bins(sums[gone], light_first, keep != first)
        for i in range(num_bins):
            relabel[light_first[i]] = heavy_first[i]
            sums[keep, heavy_first[i]] += sums[gone, light_first[i]]
        item = head[gone]
        while True:
            bins[item] = relabel[bins[item]]
            if follow[item] < 0:
                break
            item = follow[item]
        follow[item] = head[keep]
        head[keep] = head[gone]
        size[keep] += size[gone]
        spread[keep] = sums[keep].max() - sums[keep].min()
        spread[gone] = -1.0


@_jit
def _order_bins(values, out, heaviest_first):
    """Stable insertion argsort of a few bins into ``out`` (no allocation:
    cheaper than ``np.argsort`` under numba at these sizes). Ascending order
    inserts from the last bin, so a round's bins, already descending, sort
    in linear time either way."""
    n = values.shape[0]
    for step in range(n):
        j = step
        if heaviest_first:
            value = values[step]
            while j > 0 and values[out[j - 1]] < value:
                out[j] = out[j - 1]
                j -= 1
            out[j] = step
        else:
            # Equal values keep ascending index: a lower index goes first.
            value = values[n - 1 - step]
            while j > 0 and values[out[j - 1]] >= value:
                out[j] = out[j - 1]
                j -= 1
            out[j] = n - 1 - step
