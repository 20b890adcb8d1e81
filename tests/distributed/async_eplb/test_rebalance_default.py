"""The "default" policy: identical to vLLM's, valid, and the same with or
without numba.

Cases are drawn from seeded generators so that a failure names a reproducible
case: shapes, group / node / rank counts on both the hierarchical and the
global path, loads with many ties, all zeros, one hot expert, several dtypes
and layouts, with and without an old placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from vllm.distributed.async_eplb.maps import validate_placement
from vllm.distributed.async_eplb.rebalance_algo import default, rebalance_experts
from vllm.distributed.async_eplb.rebalance_algo.validation import (
    validate_rebalance_args,
)

LOAD_KINDS = (
    "uniform",
    "ties",
    "zeros",
    "one_hot",
    "zipf",
    "float16",
    "int64",
    "transposed",
)
NUM_CHUNKS = 8
CASES_PER_CHUNK = 40  # 320 random cases in all


@dataclass
class Case:
    weight: torch.Tensor
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_ranks: int
    old: torch.Tensor | None

    @property
    def args(self) -> tuple:
        return (
            self.weight,
            self.num_replicas,
            self.num_groups,
            self.num_nodes,
            self.num_ranks,
        )

    def __repr__(self) -> str:
        return (
            f"Case(weight={tuple(self.weight.shape)} {self.weight.dtype}, "
            f"P={self.num_replicas}, G={self.num_groups}, N={self.num_nodes}, "
            f"R={self.num_ranks}, old={self.old is not None})"
        )


def _load(rng: np.random.Generator, kind: str, shape: tuple[int, int]) -> torch.Tensor:
    num_layers, num_logical = shape
    if kind == "uniform":
        return torch.from_numpy(rng.random(shape, dtype=np.float32) * 100)
    if kind == "ties":
        return torch.from_numpy(rng.integers(0, 4, shape).astype(np.float32))
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "one_hot":
        load = torch.zeros(shape)
        load[
            torch.arange(num_layers),
            torch.from_numpy(rng.integers(0, num_logical, num_layers)),
        ] = 1e4
        return load
    if kind == "zipf":
        return torch.from_numpy(rng.zipf(1.5, shape).astype(np.float64))
    if kind == "float16":
        return torch.from_numpy(rng.random(shape) * 10).half()
    if kind == "int64":
        return torch.from_numpy(rng.integers(0, 1000, shape))
    assert kind == "transposed"  # non-contiguous storage, as a strided view
    return torch.from_numpy(rng.random(shape[::-1], dtype=np.float32) * 50).t()


def random_case(rng: np.random.Generator, index: int) -> Case:
    num_groups = int(rng.choice([1, 2, 3, 4, 8]))
    num_logical = num_groups * int(rng.integers(1, 7))
    num_nodes = int(rng.choice([1, 1, 2, 4]))  # 3 groups / 2 nodes: global path
    num_ranks = num_nodes * int(rng.integers(1, 5))
    slots_per_rank = -(-num_logical // num_ranks) + int(rng.integers(0, 3))
    num_replicas = num_ranks * slots_per_rank
    num_layers = int(rng.integers(1, 5))
    kind = LOAD_KINDS[index % len(LOAD_KINDS)]
    weight = _load(rng, kind, (num_layers, num_logical))
    old = None
    if index % 3 == 1:  # any ids in range: vLLM does not require a valid placement
        old = torch.from_numpy(rng.integers(0, num_logical, (num_layers, num_replicas)))
    elif index % 3 == 2:  # a real old placement, from other load
        other = torch.from_numpy(rng.integers(0, 3, (num_layers, num_logical)))
        old = rebalance_experts(other, num_replicas, num_groups, num_nodes, num_ranks)
    return Case(weight, num_replicas, num_groups, num_nodes, num_ranks, old)


def chunk_cases(chunk: int) -> list[Case]:
    rng = np.random.default_rng(1000 + chunk)
    return [random_case(rng, i) for i in range(CASES_PER_CHUNK)]


# DeepSeek-V3 geometry (58 layers x 256 experts, 8 groups) at the scales.
DEEPSEEK_LAYOUTS = {
    "ep32_hier": (288, 8, 4, 32),
    "ep32_global": (288, 8, 1, 32),
    "ep64": (320, 8, 1, 64),
    "ep144": (288, 8, 1, 144),
    "ep48_3_nodes": (288, 8, 3, 48),  # 3 nodes do not divide 8 groups: global
}


def deepseek_weight(seed: int, integer: bool) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    load = rng.zipf(1.3, (58, 256)).clip(max=10**6)
    return torch.from_numpy(load if integer else load * rng.random((58, 256)))


def ours(case: Case, use_numba: bool | None = None) -> torch.Tensor:
    load, old = validate_rebalance_args(*case.args, case.old)
    return torch.from_numpy(
        default.rebalance_default(load, *case.args[1:], old, use_numba=use_numba)
    )


def numba_modes() -> list[bool]:
    return [True, False] if default.numba_available() else [False]


@pytest.fixture(scope="module")
def vllm_policy():
    module = pytest.importorskip("vllm.distributed.eplb.policy.default")
    return module.DefaultEplbPolicy


@pytest.mark.vllm
@pytest.mark.parametrize("chunk", range(NUM_CHUNKS))
def test_identical_to_vllm_on_random_inputs(vllm_policy, chunk):
    for case in chunk_cases(chunk):
        expected = vllm_policy.rebalance_experts(*case.args, case.old)
        for use_numba in numba_modes():
            assert torch.equal(ours(case, use_numba), expected), (case, use_numba)
        # The public entry point, from torch and from numpy.
        got = rebalance_experts(*case.args, case.old)
        assert torch.equal(got, expected), case
        numpy_weight = case.weight.numpy()
        numpy_old = None if case.old is None else case.old.numpy()
        got = rebalance_experts(numpy_weight, *case.args[1:], numpy_old)
        assert torch.equal(got, expected), case


@pytest.mark.vllm
@pytest.mark.parametrize("layout", sorted(DEEPSEEK_LAYOUTS))
@pytest.mark.parametrize("integer", [False, True], ids=["float", "integer"])
def test_identical_to_vllm_at_deepseek_scale(vllm_policy, layout, integer):
    num_replicas, num_groups, num_nodes, num_ranks = DEEPSEEK_LAYOUTS[layout]
    weight = deepseek_weight(7, integer)
    args = (num_replicas, num_groups, num_nodes, num_ranks)
    expected = vllm_policy.rebalance_experts(weight, *args)
    assert torch.equal(rebalance_experts(weight, *args), expected)
    # After a drift, with the old placement to preserve slots from.
    drifted = weight * torch.from_numpy(
        np.random.default_rng(8).uniform(0.9, 1.1, (58, 256))
    )
    expected = vllm_policy.rebalance_experts(drifted, *args, expected)
    got = rebalance_experts(drifted, *args, old_global_expert_indices=expected)
    assert torch.equal(got, expected)
    for use_numba in numba_modes():
        case = Case(drifted, *args, expected)
        assert torch.equal(ours(case, use_numba), expected)


@pytest.mark.parametrize("chunk", range(0, NUM_CHUNKS, 2))
def test_numba_and_numpy_paths_identical(chunk):
    pytest.importorskip("numba")
    for case in chunk_cases(chunk):
        assert torch.equal(ours(case, True), ours(case, False)), case


@pytest.mark.parametrize("layout", sorted(DEEPSEEK_LAYOUTS))
def test_numba_and_numpy_paths_identical_at_deepseek_scale(layout):
    pytest.importorskip("numba")
    weight = deepseek_weight(3, integer=True)
    case = Case(weight, *DEEPSEEK_LAYOUTS[layout], None)
    first = ours(case, True)
    assert torch.equal(first, ours(case, False))
    case.old = first.flip(1)
    assert torch.equal(ours(case, True), ours(case, False))


def test_public_api_runs_without_numba(monkeypatch):
    """With numba missing, the entry point takes the NumPy path."""
    case = chunk_cases(0)[5]
    expected = rebalance_experts(*case.args, case.old)
    monkeypatch.setattr(default, "_numba_kernels", lambda: None)
    assert not default.numba_available()
    assert torch.equal(rebalance_experts(*case.args, case.old), expected)
    with pytest.raises(ValueError, match="use_numba=True"):
        ours(case, use_numba=True)


@pytest.mark.parametrize("chunk", range(NUM_CHUNKS))
def test_every_output_is_a_valid_placement(chunk):
    for case in chunk_cases(chunk):
        phy2log = rebalance_experts(*case.args, case.old)
        assert phy2log.dtype == torch.int64 and phy2log.device.type == "cpu"
        assert tuple(phy2log.shape) == (case.weight.shape[0], case.num_replicas)
        validate_placement(phy2log, case.weight.shape[1], case.num_ranks)


def test_hierarchical_path_keeps_each_group_on_one_node():
    weight = deepseek_weight(11, integer=False)
    num_replicas, num_groups, num_nodes, num_ranks = DEEPSEEK_LAYOUTS["ep32_hier"]
    phy2log = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks)
    group_size = weight.shape[1] // num_groups
    node_of_slot = torch.arange(num_replicas) // (num_replicas // num_nodes)
    for layer in range(weight.shape[0]):
        groups = phy2log[layer] // group_size
        for group in range(num_groups):
            assert node_of_slot[groups == group].unique().numel() == 1
        for node in range(num_nodes):  # whole groups only, all of their experts
            experts = phy2log[layer, node_of_slot == node].unique()
            assert experts.numel() == (num_groups // num_nodes) * group_size


def test_old_placement_only_permutes_within_ranks_and_keeps_most_slots():
    weight = deepseek_weight(5, integer=True)
    args = DEEPSEEK_LAYOUTS["ep32_global"]
    slots = args[0] // args[3]
    fresh = rebalance_experts(weight, *args)
    old = rebalance_experts(weight.flip(1), *args)
    kept = rebalance_experts(weight, *args, old_global_expert_indices=old)
    layers = weight.shape[0]
    fresh_ranks = fresh.reshape(layers, args[3], slots)
    kept_ranks = kept.reshape(layers, args[3], slots)
    old_ranks = old.reshape(layers, args[3], slots)
    assert torch.equal(fresh_ranks.sort(-1).values, kept_ranks.sort(-1).values)
    for layer in range(layers):
        for rank in range(args[3]):
            new_items = fresh_ranks[layer, rank].tolist()
            possible = 0
            for expert in old_ranks[layer, rank].tolist():
                if expert in new_items:
                    new_items.remove(expert)
                    possible += 1
            in_place = (kept_ranks[layer, rank] == old_ranks[layer, rank]).sum()
            assert int(in_place) == possible


@pytest.mark.parametrize("use_numba", [True, False])
def test_balanced_packing_fills_every_pack_exactly(use_numba):
    if use_numba:
        pytest.importorskip("numba")
    rng = np.random.default_rng(4)
    weight = rng.integers(0, 3, (20, 24)).astype(np.float64)
    pack_index, rank_in_pack = default.balanced_packing(weight, 6, use_numba=use_numba)
    for row in range(weight.shape[0]):
        assert np.array_equal(np.bincount(pack_index[row], minlength=6), [4] * 6)
        for pack in range(6):
            ranks = np.sort(rank_in_pack[row][pack_index[row] == pack])
            assert np.array_equal(ranks, np.arange(4))
    # The greedy's first choice: the heaviest item opens pack 0.
    first = np.argsort(-weight, axis=1)[:, 0]
    assert np.all(pack_index[np.arange(20), first] == 0)


@pytest.mark.parametrize("use_numba", [True, False])
def test_replicate_experts_gives_extra_slots_to_the_hottest(use_numba):
    if use_numba:
        pytest.importorskip("numba")
    weight = np.array([[1.0, 9.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    phy2log, count = default.replicate_experts(weight, 7, use_numba=use_numba)
    # Row 0: expert 1's share goes 9 -> 4.5 -> 3, then ties expert 2's 3 and
    # wins on the lower index.
    assert phy2log[0].tolist() == [0, 1, 2, 3, 1, 1, 1]
    assert count[0].tolist() == [1, 4, 1, 1]
    assert phy2log[1].tolist() == [0, 1, 2, 3, 0, 0, 0]  # all ties: lowest index
    assert np.array_equal(count.sum(axis=1), [7, 7])


def test_warm_up_kernels_reports_whether_numba_runs(monkeypatch):
    assert default.warm_up_kernels() == default.numba_available()
    monkeypatch.setattr(default, "_numba_kernels", lambda: None)
    assert default.warm_up_kernels() is False


@pytest.mark.vllm
def test_identical_to_vllm_for_strided_load(vllm_policy):
    """A transposed (strided) float32 load sums its groups in another order
    than a contiguous copy would, so float32 group sums differ in the last
    bit; the result still matches because the same array is summed."""
    rng = np.random.default_rng(2)
    weight = torch.from_numpy((rng.random((256, 58)) * 1e6).astype(np.float32)).t()
    strided = weight.numpy().reshape(58, 8, 32).sum(-1)
    contiguous = np.ascontiguousarray(weight.numpy()).reshape(58, 8, 32).sum(-1)
    assert not np.array_equal(strided, contiguous)  # the case is a real one
    for args in [(288, 8, 4, 32), (288, 8, 2, 16)]:
        expected = vllm_policy.rebalance_experts(weight, *args)
        assert torch.equal(rebalance_experts(weight, *args), expected)
        for use_numba in numba_modes():
            assert torch.equal(ours(Case(weight, *args, None), use_numba), expected)
