"""The "min_migration" policy, placement quality metrics, the policy benchmark."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm.distributed.async_eplb.rebalance_algo import rebalance_experts
from vllm.distributed.async_eplb.rebalance_algo.balanced import (
    rebalance_balanced,
    rebalance_spill,
)
from vllm.distributed.async_eplb.rebalance_algo.default import (
    preserve_rank_slots,
    rebalance_default,
)
from vllm.distributed.async_eplb.rebalance_algo.min_migration import (
    _relabel_onto_old,
    rebalance_min_migration,
)
from vllm.distributed.async_eplb.rebalance_algo.quality import (
    balancedness,
    bytes_moved,
    new_experts_per_rank,
    rank_loads,
)

REPO = Path(__file__).resolve().parents[3]

# (num_experts, num_groups, num_replicas, num_nodes, num_ranks)
GEOMETRIES = [
    (256, 8, 288, 4, 32),  # DeepSeek-V3 EP32, hierarchical
    (256, 8, 288, 1, 32),  # EP32, global
    (256, 8, 320, 1, 64),
    (256, 8, 288, 1, 144),  # two slots per rank
    (64, 1, 80, 1, 16),  # DeepSeek-V2-Lite (the shipped trace)
]


def _loads(seed: int, layers: int, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """A lognormal load and the same load after a 5% lognormal drift."""
    rng = np.random.default_rng(seed)
    load = (rng.lognormal(0.0, 1.0, (layers, experts)) * 100).astype(np.float32)
    drifted = (load * rng.lognormal(0.0, 0.05, load.shape)).astype(np.float32)
    return load, drifted


def _assert_valid(phy2log: np.ndarray, shape: tuple[int, int], experts: int) -> None:
    assert phy2log.shape == shape
    assert phy2log.dtype == np.int64
    assert phy2log.min() >= 0 and phy2log.max() < experts
    for row in phy2log:
        counts = np.bincount(row, minlength=experts)
        assert (counts >= 1).all()
        assert counts.max() <= shape[1] - experts + 1


def _assert_kept_slots_stay(old: np.ndarray, new: np.ndarray, num_ranks: int) -> None:
    """An expert a rank keeps stays in (as many of) its old local slots."""
    slots = old.shape[1] // num_ranks
    for old_row, new_row in zip(old, new, strict=True):
        for rank in range(num_ranks):
            before = old_row[rank * slots : (rank + 1) * slots]
            after = new_row[rank * slots : (rank + 1) * slots]
            for expert in set(before.tolist()) & set(after.tolist()):
                kept = int(((before == expert) & (after == expert)).sum())
                assert kept == min((before == expert).sum(), (after == expert).sum())


# --------------------------------------------------------------------------
# quality metrics
# --------------------------------------------------------------------------


def test_quality_metrics_on_a_hand_computed_case():
    weight = np.array([[6.0, 2.0, 1.0, 1.0]])
    # 2 ranks x 3 slots; expert 0 has two replicas (3 tokens each).
    old = np.array([[0, 1, 2, 0, 3, 3]])
    new = np.array([[0, 1, 3, 2, 0, 1]])
    np.testing.assert_allclose(rank_loads(weight, old, 2), [[6.0, 4.0]])
    np.testing.assert_allclose(balancedness(weight, old, 2), [5.0 / 6.0])
    # rank 0 gains expert 3; rank 1 gains 2 and 1 (expert 0 stays there).
    np.testing.assert_array_equal(new_experts_per_rank(old, new, 2), [[1, 2]])
    assert bytes_moved(old, new, 2, expert_bytes=10) == 30
    np.testing.assert_allclose(balancedness(np.zeros((1, 4)), old, 2), [1.0])


def test_quality_metrics_reject_bad_input():
    weight = np.ones((1, 4))
    with pytest.raises(ValueError, match="divisible"):
        rank_loads(weight, np.array([[0, 1, 2, 3, 0]]), 2)
    with pytest.raises(ValueError, match="differ in shape"):
        new_experts_per_rank(np.zeros((1, 4), int), np.zeros((1, 6), int), 2)
    with pytest.raises(ValueError, match="outside"):
        rank_loads(weight, np.array([[0, 1, 2, 7]]), 2)


# --------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_without_old_placement_equals_balanced(geometry):
    experts, groups, replicas, nodes, ranks = geometry
    load, _ = _loads(0, 4, experts)
    expected = rebalance_balanced(load, replicas, groups, nodes, ranks)
    got = rebalance_min_migration(load, replicas, groups, nodes, ranks, None)
    np.testing.assert_array_equal(got, expected)
    misshapen = expected[:, :-ranks]
    got = rebalance_min_migration(load, replicas, groups, nodes, ranks, misshapen)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_unchanged_load_moves_nothing(geometry):
    """Its own placement of the same load is kept as it is."""
    experts, groups, replicas, nodes, ranks = geometry
    load, _ = _loads(1, 4, experts)
    old = rebalance_min_migration(load, replicas, groups, nodes, ranks, None)
    got = rebalance_min_migration(load, replicas, groups, nodes, ranks, old)
    np.testing.assert_array_equal(got, old)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_from_vllms_placement_never_below_vllms_balance(geometry):
    """From the default's placement of the same load, every layer ends at
    least as balanced as the default (the target is capped at its peak)."""
    experts, groups, replicas, nodes, ranks = geometry
    load, _ = _loads(5, 4, experts)
    old = rebalance_default(load, replicas, groups, nodes, ranks)
    got = rebalance_min_migration(load, replicas, groups, nodes, ranks, old)
    _assert_valid(got, old.shape, experts)
    assert (
        balancedness(load, got, ranks) >= balancedness(load, old, ranks) - 1e-12
    ).all()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_valid_placement_from_any_old_placement(geometry, seed):
    """Random loads (some zero) and random old placements, not the default's."""
    experts, groups, replicas, nodes, ranks = geometry
    rng = np.random.default_rng(seed)
    layers = 3
    load = rng.lognormal(0.0, 2.0, (layers, experts)).astype(np.float32)
    load[0, rng.random(experts) < 0.3] = 0.0
    load[1] = 0.0
    old = np.stack(
        [
            rng.permutation(
                np.concatenate(
                    [np.arange(experts), rng.integers(0, experts, replicas - experts)]
                )
            )
            for _ in range(layers)
        ]
    )
    got = rebalance_min_migration(load, replicas, groups, nodes, ranks, old)
    _assert_valid(got, (layers, replicas), experts)
    _assert_kept_slots_stay(old, got, ranks)
    default = rebalance_default(load, replicas, groups, nodes, ranks)
    assert (
        balancedness(load, got, ranks).mean()
        >= balancedness(load, default, ranks).mean() - 0.01
    )


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_drift_moves_far_fewer_experts_at_the_same_balance(geometry):
    experts, groups, replicas, nodes, ranks = geometry
    load, drifted = _loads(2, 6, experts)
    old = rebalance_default(load, replicas, groups, nodes, ranks)
    default = rebalance_default(drifted, replicas, groups, nodes, ranks, old)
    got = rebalance_experts(
        drifted, replicas, groups, nodes, ranks, old, policy="min_migration"
    ).numpy()
    _assert_valid(got, old.shape, experts)
    _assert_kept_slots_stay(old, got, ranks)
    moved = new_experts_per_rank(old, got, ranks).mean()
    moved_default = new_experts_per_rank(old, default, ranks).mean()
    assert moved <= moved_default / 4
    # Never below vLLM's balance, layer by layer.
    assert (
        balancedness(drifted, got, ranks)
        >= balancedness(drifted, default, ranks) - 1e-12
    ).all()


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[3]])
def test_fallback_relabels_the_balanced_packs(geometry):
    """A layer whose repair fails takes the balanced packs, relabelled onto
    ranks: same replicas per rank as some rank of the balanced placement,
    nodes' expert groups kept together, and fewer experts moved."""
    experts, groups, replicas, nodes, ranks = geometry
    load, drifted = _loads(3, 3, experts)
    old = rebalance_default(load, replicas, groups, nodes, ranks)
    default = rebalance_balanced(drifted, replicas, groups, nodes, ranks, old)
    per_node = ranks // nodes if nodes > 1 else ranks
    relabelled = np.stack(
        [
            _relabel_onto_old(new_row, old_row, ranks, per_node)
            for new_row, old_row in zip(default, old, strict=True)
        ]
    )
    got = preserve_rank_slots(relabelled, old, ranks)
    slots = replicas // ranks

    def packs(placement: np.ndarray) -> list[list[tuple[int, ...]]]:
        return [
            sorted(tuple(sorted(pack)) for pack in row.reshape(ranks, slots).tolist())
            for row in placement
        ]

    assert packs(got) == packs(default)
    np.testing.assert_allclose(
        balancedness(drifted, got, ranks), balancedness(drifted, default, ranks)
    )
    _assert_kept_slots_stay(old, got, ranks)
    assert (
        new_experts_per_rank(old, got, ranks).sum()
        < new_experts_per_rank(old, default, ranks).sum()
    )
    if nodes > 1:
        group_size = experts // groups
        per_node = replicas // nodes
        for row in got:
            for node in range(nodes):
                node_slots = row[node * per_node : (node + 1) * per_node]
                assert len(set(node_slots // group_size)) == groups // nodes


def test_pure_python_fallback_matches_numba():
    """Without numba the same kernels run as plain Python, with the same result."""
    pytest.importorskip("numba")
    load, drifted = _loads(4, 2, 32)
    old = rebalance_default(load, 48, 4, 2, 8)
    expected = [
        rebalance_min_migration(drifted, 48, 4, 2, 8, old),
        rebalance_min_migration(drifted, 48, 4, 2, 8, old, tolerance=-1.0),
        rebalance_balanced(drifted, 48, 4, 2, 8),
        rebalance_spill(drifted, 48, 4, 2, 8),
    ]
    script = (
        "import sys, json, numpy as np\n"
        "sys.modules['numba'] = None\n"
        "from vllm.distributed.async_eplb.rebalance_algo import min_migration as m\n"
        "from vllm.distributed.async_eplb.rebalance_algo import balanced as b\n"
        "assert not m.HAS_NUMBA\n"
        "a = json.loads(sys.stdin.read())\n"
        "w, old = np.array(a['w'], np.float32), np.array(a['old'], np.int64)\n"
        "out = [m.rebalance_min_migration(w, 48, 4, 2, 8, old, tolerance=t).tolist()\n"
        "       for t in (m.DEFAULT_TOLERANCE, -1.0)]\n"
        "out += [f(w, 48, 4, 2, 8).tolist()\n"
        "        for f in (b.rebalance_balanced, b.rebalance_spill)]\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps({"w": drifted.tolist(), "old": old.tolist()}),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for without_numba, with_numba in zip(got, expected, strict=True):
        np.testing.assert_array_equal(without_numba, with_numba)


# --------------------------------------------------------------------------
# the benchmark script
# --------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.skipif(
    importlib.util.find_spec("vllm.distributed.eplb") is None,
    reason="the policy benchmark compares against vLLM's policy",
)
def test_bench_policy_quick_writes_json(tmp_path):
    out = tmp_path / "policy.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "eplb" / "bench_policy.py"),
            "--quick",
            "--json",
            str(out),
        ],
        check=True,
        timeout=600,
        env=env,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert {"machine", "date", "configs"} <= report.keys()
    assert report["configs"]
    for config in report["configs"]:
        assert {
            "name",
            "load",
            "geometry",
            "time_ms",
            "balancedness",
            "bound",
            "gap_closed",
            "drift",
        } <= config.keys()
        policies = {"vllm", "default", "balanced", "balanced_spill", "min_migration"}
        assert set(config["time_ms"]) == policies
        assert max(config["balancedness"].values()) <= config["bound"] + 1e-9
        drift = config["drift"]
        for policy in policies:
            assert {"new_experts_per_rank", "bytes_moved", "balancedness"} <= (
                drift[policy].keys()
            )
        assert (
            drift["default"]["new_experts_per_rank"]
            == drift["vllm"]["new_experts_per_rank"]
        )


@pytest.mark.parametrize("task", ["intent", "law", "summary", "translation"])
def test_large_real_drift_moves_a_quarter_at_vllms_balance(task):
    """ESFT DeepSeek-V2-Lite routing: the old placement is the default's for
    the task's first half, the new load the whole task (a large drift). On
    EP16 x 5 and EP32 x 3 slots per rank: at most a quarter of the default's
    moved experts, every layer at or above the default's balance."""
    trace = REPO / "vllm/distributed/async_eplb/data/loads_w128.npz"
    with np.load(trace) as archive:
        windows = archive[task]
    half = windows[: len(windows) // 2].sum(axis=0).astype(np.float32)
    whole = windows.sum(axis=0).astype(np.float32)
    for replicas, ranks in ((80, 16), (96, 32)):
        old = rebalance_default(half, replicas, 1, 1, ranks)
        default = rebalance_default(whole, replicas, 1, 1, ranks, old)
        got = rebalance_min_migration(whole, replicas, 1, 1, ranks, old)
        moved = new_experts_per_rank(old, got, ranks).mean()
        assert moved <= new_experts_per_rank(old, default, ranks).mean() / 4, ranks
        assert (
            balancedness(whole, got, ranks)
            >= balancedness(whole, default, ranks) - 1e-12
        ).all(), ranks


def test_a_layer_the_repair_cannot_fix_takes_the_relabelled_balanced_packs(
    monkeypatch,
):
    """The fallback path: the repair is made to report layer 1 unreached; that
    layer, and only it, becomes the balanced packs relabelled onto the old
    ranks (nodes first), kept experts in their old slots."""
    from vllm.distributed.async_eplb.rebalance_algo import min_migration

    experts, groups, replicas, nodes, ranks = GEOMETRIES[0]
    load, drifted = _loads(5, 3, experts)
    old = rebalance_default(load, replicas, groups, nodes, ranks)
    repaired = rebalance_min_migration(drifted, replicas, groups, nodes, ranks, old)
    repair = min_migration._repair_rows

    def repair_failing_layer_one(*args):
        repair(*args)
        args[-1][1] = False  # ``reached``

    monkeypatch.setattr(min_migration, "_repair_rows", repair_failing_layer_one)
    got = rebalance_min_migration(drifted, replicas, groups, nodes, ranks, old)
    fresh = rebalance_balanced(drifted, replicas, groups, nodes, ranks)
    expected = _relabel_onto_old(fresh[1], old[1], ranks, ranks // nodes)
    np.testing.assert_array_equal(
        got[1], preserve_rank_slots(expected[None], old[1:2], ranks)[0]
    )
    np.testing.assert_array_equal(got[[0, 2]], repaired[[0, 2]])
