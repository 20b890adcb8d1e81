"""The "balanced" and "balanced_spill" policies, their packing and search
kernels, and the balance bound and locality metrics in ``quality``."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from vllm.distributed.async_eplb.rebalance_algo import rebalance_experts
from vllm.distributed.async_eplb.rebalance_algo.balanced import (
    rebalance_balanced,
    rebalance_spill,
)
from vllm.distributed.async_eplb.rebalance_algo.default import (
    rebalance_default,
    replicate_hierarchical,
)
from vllm.distributed.async_eplb.rebalance_algo.differencing import (
    differencing_packing,
)
from vllm.distributed.async_eplb.rebalance_algo.local_search import (
    bin_loads,
    improve_bins,
)
from vllm.distributed.async_eplb.rebalance_algo.quality import (
    balancedness_bound,
    logged_balancedness,
    mean_nodes_touched,
    peak_lower_bound,
    rank_loads,
)

TRACE = (
    Path(__file__).resolve().parents[3]
    / "vllm/distributed/async_eplb/data/loads_w128.npz"
)

# (num_experts, num_groups, num_replicas, num_nodes, num_ranks)
GEOMETRIES = [
    (256, 8, 288, 4, 32),  # DeepSeek-V3 EP32, hierarchical
    (256, 8, 288, 1, 32),
    (256, 8, 320, 1, 64),
    (256, 8, 288, 1, 144),  # two slots per rank
    (64, 8, 96, 4, 32),  # DeepSeek-V2-Lite, 8 groups on 4 nodes
    (64, 1, 80, 1, 16),
    (12, 4, 18, 2, 6),
]


def _lognormal(seed: int, layers: int, experts: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.lognormal(0.0, 1.0, (layers, experts)) * 100).astype(np.float32)


def _assert_valid(phy2log: np.ndarray, layers: int, replicas: int, experts: int):
    assert phy2log.shape == (layers, replicas) and phy2log.dtype == np.int64
    for row in phy2log:
        counts = np.bincount(row, minlength=experts)
        assert counts.shape == (experts,) and (counts >= 1).all()


def _node_of_expert(weight, replicas, groups, nodes) -> np.ndarray:
    """Node of each expert's group, as the hierarchical policy packs groups."""
    mlog2log = replicate_hierarchical(weight, replicas, groups, nodes).mlog2log
    experts = weight.shape[1]
    node_of = np.empty_like(mlog2log)
    np.put_along_axis(
        node_of,
        mlog2log,
        np.broadcast_to(np.arange(experts) // (experts // nodes), mlog2log.shape),
        axis=1,
    )
    return node_of


# --------------------------------------------------------------------------
# quality: bound and metrics
# --------------------------------------------------------------------------


def test_peak_lower_bound_is_the_best_over_all_replica_counts():
    """m* by brute force over every count vector, on small random cases."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        experts = int(rng.integers(2, 5))
        ranks = int(rng.integers(1, 4))
        replicas = ranks * int(rng.integers(-(-experts // ranks), 5))
        weight = rng.integers(0, 50, (1, experts)).astype(np.float64)
        best = min(
            (weight[0] / np.array(c)).max()
            for c in itertools.product(range(1, replicas + 1), repeat=experts)
            if sum(c) == replicas
        )
        expected = max(best, weight.sum() / ranks)
        np.testing.assert_allclose(
            peak_lower_bound(weight, replicas, ranks), [expected]
        )


def test_bound_and_logged_balancedness_by_hand():
    weight = np.array([[6.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    placement = np.array([[0, 1, 2, 0, 3, 3], [0, 1, 2, 3, 0, 1]])
    # layer 0: rank loads 3+2+1=6 and 3+0.5+0.5=4; layer 1 idle.
    assert logged_balancedness(weight, placement, 2) == pytest.approx(5.0 / 6.0)
    # m* = 3 (expert 0 twice) < mean 5: the bound is the mean, balance 1.
    np.testing.assert_allclose(peak_lower_bound(weight, 6, 2), [5.0, 0.0])
    assert balancedness_bound(weight, 6, 2) == pytest.approx(1.0)
    # One hot expert: m* = 12 / 2 = 6 > mean 4, bound 4 / 6.
    hot = np.array([[12.0, 1.0, 1.0, 1.0, 1.0]])
    assert balancedness_bound(hot, 6, 3) == pytest.approx((16.0 / 3.0) / 6.0)
    with pytest.raises(ValueError, match="fewer than"):
        peak_lower_bound(hot, 4, 2)


def test_mean_nodes_touched_by_hand():
    # 4 ranks x 1 slot on 2 nodes: experts 0, 1 on node 0; 2 and a replica
    # of 0 on node 1.
    placement = np.array([0, 1, 2, 0])
    tokens = np.array([[0, 1], [1, 2], [2, 2]])
    # token 0: expert 1 on node 0; expert 0 on node 0 or 1 (half each):
    #   1 + 0.5 nodes; token 1: 2 nodes; token 2: 1 node.
    assert mean_nodes_touched(tokens, placement, 4, 2) == pytest.approx(4.5 / 3)
    with pytest.raises(ValueError, match="outside"):
        mean_nodes_touched(np.array([[5, 0]]), placement, 4, 2)
    with pytest.raises(ValueError, match="divide"):
        mean_nodes_touched(tokens, placement, 4, 3)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_no_policy_beats_the_bound(geometry):
    experts, groups, replicas, nodes, ranks = geometry
    load = _lognormal(1, 3, experts)
    bound = balancedness_bound(load, replicas, ranks)
    for policy in ("default", "balanced", "balanced_spill"):
        placement = rebalance_experts(
            load, replicas, groups, nodes, ranks, policy=policy
        )
        assert logged_balancedness(load, placement, ranks) <= bound + 1e-9


# --------------------------------------------------------------------------
# kernels: differencing and local search
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("items", "bins"), [(12, 4), (288, 32), (10, 10), (6, 1)])
def test_differencing_fills_every_bin_equally(items, bins):
    load = np.random.default_rng(items).lognormal(0.0, 1.0, (3, items))
    packed = differencing_packing(load, bins)
    for row in packed:
        assert (np.bincount(row, minlength=bins) == items // bins).all()
    with pytest.raises(ValueError, match="do not split"):
        differencing_packing(load[:, :-1], bins if bins > 1 else 4)


@pytest.mark.parametrize("seed", range(6))
def test_local_search_is_never_worse_than_its_start(seed):
    rng = np.random.default_rng(seed)
    bins, per_bin = int(rng.integers(2, 9)), int(rng.integers(1, 7))
    items = bins * per_bin
    load = rng.lognormal(0.0, 1.5, (5, items))
    load[0] = np.round(load[0])  # ties
    start = np.stack([rng.permutation(items) % bins for _ in range(5)])
    out, slot = improve_bins(load, start, bins)
    before = bin_loads(load, start, bins).max(axis=1)
    after = bin_loads(load, out, bins).max(axis=1)
    assert (after <= before + 1e-9).all()
    for row_bins, row_slots in zip(out, slot, strict=True):
        assert (np.bincount(row_bins, minlength=bins) == per_bin).all()
        # (bin, slot) names every position exactly once.
        pairs = set(zip(row_bins.tolist(), row_slots.tolist(), strict=True))
        assert len(pairs) == items
    # A local optimum: no swap with the fullest bin lowers that pair's peak.
    for row_load, row_bins in zip(load, out, strict=True):
        totals = np.bincount(row_bins, weights=row_load, minlength=bins)
        hot = int(np.argmax(totals))
        for i in np.flatnonzero(row_bins == hot):
            for j in np.flatnonzero(row_bins != hot):
                shift = row_load[i] - row_load[j]
                peak = max(totals[hot] - shift, totals[row_bins[j]] + shift)
                assert peak >= totals[hot] * (1 - 1e-6)


def test_local_search_keeps_pinned_items_home():
    rng = np.random.default_rng(7)
    bins, per_node, per_bin = 8, 4, 3
    items = bins * per_bin
    load = rng.lognormal(0.0, 1.0, (4, items))
    start = np.tile(np.arange(items) // per_bin, (4, 1))
    home = np.where(rng.random((4, items)) < 0.5, start // per_node, -1)
    out, _ = improve_bins(load, start, bins, home=home, bins_per_node=per_node)
    pinned = home >= 0
    assert (out[pinned] // per_node == home[pinned]).all()
    assert (
        bin_loads(load, out, bins).max(1) <= bin_loads(load, start, bins).max(1) + 1e-9
    ).all()
    with pytest.raises(ValueError, match="off its home node"):
        improve_bins(
            load, start, bins, home=(start // per_node + 1) % 2, bins_per_node=4
        )
    with pytest.raises(ValueError, match="every bin"):
        improve_bins(load, np.zeros_like(start), bins)


# --------------------------------------------------------------------------
# the policies
# --------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_balanced_is_valid_and_never_above_the_default_peak(geometry):
    experts, groups, replicas, nodes, ranks = geometry
    load = _lognormal(2, 4, experts)
    load[1, ::3] = 0.0
    got = rebalance_balanced(load, replicas, groups, nodes, ranks)
    _assert_valid(got, 4, replicas, experts)
    default = rebalance_default(load, replicas, groups, nodes, ranks)
    peak = rank_loads(load, got, ranks).max(axis=1)
    assert (peak <= rank_loads(load, default, ranks).max(axis=1) + 1e-9).all()
    # Same replica counts as the default's.
    for a, b in zip(got, default, strict=True):
        np.testing.assert_array_equal(
            np.bincount(a, minlength=experts), np.bincount(b, minlength=experts)
        )
    if nodes > 1 and groups % nodes == 0:
        # Strictly hierarchical: every replica on its group's node.
        node_of = _node_of_expert(load, replicas, groups, nodes)
        slot_node = np.arange(replicas) // (replicas // nodes)
        for layer in range(4):
            assert (node_of[layer, got[layer]] == slot_node).all()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_spill_keeps_a_replica_of_every_expert_on_its_groups_node(geometry):
    experts, groups, replicas, nodes, ranks = geometry
    load = _lognormal(3, 4, experts)
    got = rebalance_spill(load, replicas, groups, nodes, ranks)
    _assert_valid(got, 4, replicas, experts)
    if nodes == 1 or groups % nodes:
        np.testing.assert_array_equal(
            got, rebalance_balanced(load, replicas, groups, nodes, ranks)
        )
        return
    node_of = _node_of_expert(load, replicas, groups, nodes)
    slot_node = np.arange(replicas) // (replicas // nodes)
    for layer in range(4):
        home_slots = node_of[layer, got[layer]] == slot_node
        assert set(got[layer][home_slots].tolist()) == set(range(experts))


def test_balanced_closes_most_of_the_gap_on_real_load():
    """ESFT DeepSeek-V2-Lite, whole-task load, EP16 x 5 slots and EP32 x 3:
    at least three quarters of the default's gap to the bound closed."""
    with np.load(TRACE) as archive:
        tasks = [archive[name].sum(axis=0).astype(np.float32) for name in archive]
    for load in tasks:
        for replicas, ranks in ((80, 16), (96, 32)):
            default = rebalance_default(load, replicas, 1, 1, ranks)
            got = rebalance_balanced(load, replicas, 1, 1, ranks)
            before = logged_balancedness(load, default, ranks)
            after = logged_balancedness(load, got, ranks)
            bound = balancedness_bound(load, replicas, ranks)
            assert after - before >= 0.75 * (bound - before) - 1e-9, (
                replicas,
                ranks,
                before,
                after,
                bound,
            )


def test_spill_closes_three_quarters_of_the_hierarchical_gap():
    """DeepSeek-V3 geometry, 8 groups on 4 nodes, EP32 (9 slots per rank):
    with redundant replicas free to leave their group's node, at least three
    quarters of the hierarchical default's gap to the global bound closed."""
    load = _lognormal(0, 16, 256)
    default = rebalance_default(load, 288, 8, 4, 32)
    got = rebalance_spill(load, 288, 8, 4, 32)
    before = logged_balancedness(load, default, 32)
    after = logged_balancedness(load, got, 32)
    bound = balancedness_bound(load, 288, 32)
    assert after - before >= 0.75 * (bound - before), (before, after, bound)
