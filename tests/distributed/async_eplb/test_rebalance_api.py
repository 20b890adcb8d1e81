"""``rebalance_experts``: accepted inputs, policy dispatch, and a ValueError
naming the bad value for every kind of bad argument."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
import torch

from vllm.distributed.async_eplb.maps import validate_placement
from vllm.distributed.async_eplb.rebalance_algo import POLICIES, rebalance_experts

LAYERS, EXPERTS = 3, 16


def load() -> torch.Tensor:
    return torch.arange(LAYERS * EXPERTS, dtype=torch.float32).reshape(LAYERS, EXPERTS)


# (num_replicas, num_groups, num_nodes, num_ranks)
GOOD = (24, 4, 2, 4)


def test_policies_lists_all():
    assert set(POLICIES) == {"default", "balanced", "balanced_spill", "min_migration"}


@pytest.mark.parametrize(
    "weight",
    [
        load(),
        load().double(),
        load().half(),
        load().bfloat16(),
        load().long(),
        load().int(),
        load().numpy(),
        load().numpy().astype(np.float64),
        load().numpy().astype(np.int32),
        load().t().contiguous().t(),
    ],
    ids=lambda w: f"{type(w).__module__.split('.')[0]}-{w.dtype}",
)
def test_accepts_tensors_and_arrays_of_any_real_dtype(weight):
    phy2log = rebalance_experts(weight, *GOOD)
    assert isinstance(phy2log, torch.Tensor)
    assert phy2log.dtype == torch.int64 and phy2log.device.type == "cpu"
    assert tuple(phy2log.shape) == (LAYERS, GOOD[0])
    validate_placement(phy2log, EXPERTS, GOOD[3])
    # Exact dtypes for these small integers: every input gives the same answer.
    assert torch.equal(phy2log, rebalance_experts(load(), *GOOD))


def test_old_placement_as_tensor_or_array_of_any_int_dtype():
    old = rebalance_experts(load().flip(1), *GOOD)
    expected = rebalance_experts(load(), *GOOD, old)
    for form in (old.int(), old.numpy(), old.numpy().astype(np.uint16)):
        assert torch.equal(rebalance_experts(load(), *GOOD, form), expected)


def test_dispatches_min_migration_lazily(monkeypatch):
    """The policy module is imported at the call, and gets validated arrays."""
    seen = {}

    def fake_policy(weight, num_replicas, num_groups, num_nodes, num_ranks, old):
        seen.update(weight=weight, old=old, counts=(num_replicas, num_groups))
        return np.tile(np.arange(num_replicas) % EXPERTS, (weight.shape[0], 1))

    fake = types.ModuleType("min_migration")
    fake.rebalance_min_migration = fake_policy
    monkeypatch.setitem(
        sys.modules, "vllm.distributed.async_eplb.rebalance_algo.min_migration", fake
    )
    old = torch.zeros(LAYERS, GOOD[0], dtype=torch.int32)
    phy2log = rebalance_experts(load().long(), *GOOD, old, policy="min_migration")
    assert seen["weight"].dtype == np.float32 and seen["old"].dtype == np.int64
    assert seen["counts"] == GOOD[:2]
    assert phy2log.dtype == torch.int64
    assert phy2log[0, EXPERTS].item() == 0


def _error(match: str):
    return pytest.raises(ValueError, match=re.escape(match))


def test_unknown_policy_lists_the_valid_ones():
    with _error(
        "unknown policy 'fastest'; valid policies: "
        "['balanced', 'balanced_spill', 'default', 'min_migration']"
    ):
        rebalance_experts(load(), *GOOD, policy="fastest")


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ((12, 4, 2, 4), "num_replicas=12 is fewer than the 16 logical experts"),
        ((26, 4, 2, 4), "num_replicas=26 is not divisible by num_ranks=4"),
        ((24, 4, 4, 6), "num_ranks=6 is not divisible by num_nodes=4"),
        ((24, 6, 2, 4), "num_groups=6 does not divide the 16 logical experts"),
        ((0, 4, 2, 4), "num_replicas must be > 0, got 0"),
        ((24, -1, 2, 4), "num_groups must be > 0, got -1"),
        ((24, 4, 0, 4), "num_nodes must be > 0, got 0"),
        ((24, 4, 2, 0), "num_ranks must be > 0, got 0"),
        ((24.0, 4, 2, 4), "num_replicas must be an int, got 24.0"),
        ((24, 4, True, 4), "num_nodes must be an int, got True"),
    ],
)
def test_bad_counts(counts, message):
    with _error(message):
        rebalance_experts(load(), *counts)


def test_groups_need_not_divide_experts_on_the_global_path():
    # 3 nodes do not divide 5 groups: the global path ignores groups.
    phy2log = rebalance_experts(load(), 24, 5, 3, 3)
    validate_placement(phy2log, EXPERTS, 3)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (float("nan"), "weight[1, 5] = nan"),
        (float("inf"), "weight[1, 5] = inf"),
        (-2.0, "weight[1, 5] = -2.0"),
    ],
)
def test_bad_load_values(bad, message):
    weight = load()
    weight[1, 5] = bad
    with _error(message):
        rebalance_experts(weight, *GOOD)
    with _error(message):
        rebalance_experts(weight.numpy(), *GOOD)


def test_load_beyond_float32_is_named():
    weight = load().double()
    weight[2, 3] = 1e300
    with _error("weight[2, 3] = inf (as float32)"):
        rebalance_experts(weight, *GOOD)


def test_group_load_overflowing_float32_is_refused():
    weight = torch.full((LAYERS, EXPERTS), 3e38)
    with _error("load of an expert group overflows float32"):
        rebalance_experts(weight, *GOOD)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (torch.ones(EXPERTS), "weight must have shape [L, E], got (16,)"),
        (torch.ones(2, 2, 4), "weight must have shape [L, E], got (2, 2, 4)"),
        (np.ones((0, EXPERTS)), "at least one layer and one expert, got shape (0, 16)"),
        (torch.ones(LAYERS, EXPERTS, dtype=torch.bool), "got torch.bool"),
        (torch.ones(LAYERS, EXPERTS, dtype=torch.complex64), "got torch.complex64"),
        (np.ones((LAYERS, EXPERTS), dtype=bool), "got bool"),
        ([[1.0] * EXPERTS] * LAYERS, "got <class 'list'>"),
    ],
    ids=["1d", "3d", "no-layers", "bool", "complex", "np-bool", "list"],
)
def test_bad_weight(weight, message):
    with _error(message):
        rebalance_experts(weight, *GOOD)


@pytest.mark.parametrize(
    ("old", "message"),
    [
        (
            torch.zeros(LAYERS, 20, dtype=torch.int64),
            "old_global_expert_indices has shape (3, 20), expected (3, 24)",
        ),
        (
            torch.zeros(LAYERS + 1, 24, dtype=torch.int64),
            "old_global_expert_indices has shape (4, 24), expected (3, 24)",
        ),
        (torch.zeros(LAYERS, 24), "must hold integer ids, got torch.float32"),
        (np.zeros((LAYERS, 24)), "must hold integer ids, got float64"),
        ([[0] * 24] * LAYERS, "got <class 'list'>"),
    ],
    ids=["slots", "layers", "float", "np-float", "list"],
)
def test_bad_old_placement_shape_or_type(old, message):
    with _error(message):
        rebalance_experts(load(), *GOOD, old)


@pytest.mark.parametrize("bad_id", [-1, EXPERTS, 1000])
def test_old_placement_ids_out_of_range(bad_id):
    old = torch.zeros(LAYERS, 24, dtype=torch.int64)
    old[2, 7] = bad_id
    with _error(
        f"old_global_expert_indices[2, 7] = {bad_id} is not a logical expert id "
        f"in [0, {EXPERTS})"
    ):
        rebalance_experts(load(), *GOOD, old)


def test_bad_input_leaves_inputs_untouched():
    weight = load()
    weight[0, 0] = -1.0
    before = weight.clone()
    with pytest.raises(ValueError):
        rebalance_experts(weight, *GOOD)
    assert torch.equal(weight, before)


def test_warm_up_compiles_the_policy_kernels_and_names_bad_policies():
    from vllm.distributed.async_eplb.rebalance_algo import warm_up
    from vllm.distributed.async_eplb.rebalance_algo.default import numba_available

    with pytest.raises(ValueError, match="'nope'"):
        warm_up("nope")
    if not numba_available():
        warm_up("min_migration")  # a no-op on the NumPy path, and no error
        return
    from vllm.distributed.async_eplb.rebalance_algo import balanced, min_migration

    warm_up("min_migration")
    for kernel in ("_repair_rows", "_relabel_onto_old"):
        assert getattr(min_migration, kernel).signatures, kernel
    for kernel in ("_balance_rows", "_spill_to_nodes", "_pack_rows"):
        assert getattr(balanced, kernel).signatures, kernel
