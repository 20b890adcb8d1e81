"""Load window, attribution under the map in force, balancedness, predicted gain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm.distributed.async_eplb.load_stats import (
    LoadWindow,
    balancedness,
    fold_to_logical,
    predicted_balancedness,
    predicted_rank_load,
    tokens_per_rank,
)


def test_fold_attributes_with_given_map() -> None:
    phy2log = torch.tensor([[0, 1, 2, 0]])
    load = torch.tensor([[5, 1, 2, 3]], dtype=torch.int32)
    assert fold_to_logical(load, phy2log, 3).tolist() == [[8, 1, 2]]


def test_window_keeps_attribution_across_a_commit() -> None:
    before = torch.tensor([[0, 1, 2, 0]])
    after = torch.tensor([[2, 1, 0, 0]])  # slots 0 and 2 swapped experts
    window = LoadWindow(3, before, num_logical_experts=3)
    load = torch.tensor([[4, 0, 1, 0]])
    window.record(load)  # slot 0 served expert 0 at the time
    window.placement_changed(after)
    window.record(load)  # now slot 0 serves expert 2
    assert window.total().tolist() == [[5, 0, 5]]


def test_window_is_a_ring_of_the_last_steps() -> None:
    phy2log = torch.tensor([[0, 1]])
    window = LoadWindow(2, phy2log, num_logical_experts=2)
    window.record(torch.tensor([[100, 0]]))
    window.placement_changed(torch.tensor([[1, 0]]))
    for value in (1, 2):
        window.record(torch.tensor([[value, 0]]))
    # the step of 100 (old map) left the window
    assert window.total().tolist() == [[0, 3]]
    assert window.num_recorded == 3
    window.placement_changed(torch.tensor([[0, 1]]))
    assert len(window._placements) == 2  # the unreferenced first map is dropped


@pytest.mark.parametrize("seed", range(12))
def test_window_total_matches_a_fold_per_recorded_step(seed: int) -> None:
    """Many commits inside the window, several layers: same as folding each
    step in the window with the placement it was recorded under."""
    gen = torch.Generator().manual_seed(seed)
    layers, slots, experts, size = 3, 8, 5, 6
    placement = torch.randint(experts, (layers, slots), generator=gen)
    window = LoadWindow(size, placement, num_logical_experts=experts)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    for _ in range(int(torch.randint(1, 20, (), generator=gen))):
        if torch.rand((), generator=gen) < 0.4:  # a commit changes the placement
            placement = torch.randint(experts, (layers, slots), generator=gen)
            window.placement_changed(placement)
        load = torch.randint(0, 50, (layers, slots), dtype=torch.int32, generator=gen)
        window.record(load)
        history.append((load, placement))
    expected = sum(fold_to_logical(load, p, experts) for load, p in history[-size:])
    assert torch.equal(window.total(), expected)
    assert window.total().dtype == torch.int64


@pytest.mark.parametrize("steps", [1, 3, 4, 9])  # part-filled, full, wrapped
def test_window_total_under_one_placement(steps: int) -> None:
    placement = torch.tensor([[0, 2, 1, 2], [1, 1, 0, 2]])
    window = LoadWindow(4, placement, num_logical_experts=3)
    loads = [torch.full((2, 4), i + 1) * torch.arange(1, 5) for i in range(steps)]
    for load in loads:
        window.record(load)
    expected = fold_to_logical(sum(loads[-4:]), placement, 3)
    assert torch.equal(window.total(), expected)


def test_empty_window_totals_zero() -> None:
    window = LoadWindow(4, torch.tensor([[0, 1, 1]]), num_logical_experts=2)
    assert window.total().tolist() == [[0, 0]]


def test_balancedness_is_vllm_sum_of_means_over_sum_of_maxes() -> None:
    rank_tokens = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    avg, peak, value = balancedness(rank_tokens)
    assert (avg, peak) == (4.0, 5.0)
    assert value == pytest.approx(0.8)
    assert balancedness(torch.zeros(1, 2))[2] == 0.0


def test_tokens_per_rank_and_prediction_split_over_replicas() -> None:
    phy2log = torch.tensor([[0, 0, 1, 2]])  # expert 0 replicated on rank 0
    load = torch.tensor([[8.0, 2.0, 2.0]])
    assert predicted_rank_load(load, phy2log, 2).tolist() == [[8.0, 4.0]]
    assert tokens_per_rank(torch.tensor([[1, 2, 3, 4]]), 2).tolist() == [[3, 7]]
    better = torch.tensor([[0, 1, 0, 2]])
    assert predicted_balancedness(load, better, 2) == pytest.approx(1.0)
    assert predicted_balancedness(load, phy2log, 2) == pytest.approx(6 / 8)


@pytest.mark.parametrize(
    "load",
    [torch.tensor([[1.0, float("nan"), 0.0]]), torch.tensor([[1.0, -1.0, 0.0]])],
)
def test_bad_load_is_rejected(load: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"NaN|negative"):
        predicted_balancedness(load, torch.tensor([[0, 1, 2, 0]]), 2)


def test_shape_mismatch_and_bad_geometry_are_rejected() -> None:
    with pytest.raises(ValueError, match="does not match"):
        fold_to_logical(torch.zeros(1, 3), torch.zeros(1, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="not divisible"):
        tokens_per_rank(torch.zeros(1, 5), 2)
    with pytest.raises(ValueError, match="window_size"):
        LoadWindow(0, torch.zeros(1, 2, dtype=torch.long), 2)
    window = LoadWindow(2, torch.zeros(1, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="does not match"):
        window.record(torch.zeros(1, 3))


def _reference_total(
    history: list[tuple[torch.Tensor, torch.Tensor]], size: int, experts: int
) -> np.ndarray:
    """Plain numpy: fold each of the last ``size`` steps with its own map."""
    layers = history[0][0].shape[0]
    out = np.zeros((layers, experts), dtype=np.int64)
    for load, placement in history[-size:]:
        for layer in range(layers):
            np.add.at(out[layer], placement[layer].numpy(), load[layer].numpy())
    return out


def _run_window(
    seed: int,
    size: int,
    commits_before: list[int],
    steps: int,
    layers: int = 3,
    slots: int = 8,
    experts: int = 5,
) -> tuple[LoadWindow, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``steps`` random loads, committing a random map before each
    step index in ``commits_before``; returns the window and its history."""
    gen = torch.Generator().manual_seed(seed)
    placement = torch.randint(experts, (layers, slots), generator=gen)
    window = LoadWindow(size, placement, num_logical_experts=experts)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step in range(steps):
        if step in commits_before:
            placement = torch.randint(experts, (layers, slots), generator=gen)
            window.placement_changed(placement)
        load = torch.randint(0, 1000, (layers, slots), generator=gen)
        window.record(load)
        history.append((load, placement))
    return window, history


def _assert_matches_reference(
    window: LoadWindow, history: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    total = window.total()
    assert total.dtype == torch.int64
    expected = _reference_total(history, window.window_size, window.num_logical_experts)
    np.testing.assert_array_equal(total.numpy(), expected)


@pytest.mark.parametrize("seed", range(4))
def test_fold_with_several_commits_inside_the_window(seed: int) -> None:
    # full window of 12, not wrapped: 4 versions in slot order
    window, history = _run_window(seed, 12, commits_before=[3, 5, 9], steps=12)
    assert len(window._runs(range(window.window_size))) == 4
    _assert_matches_reference(window, history)


@pytest.mark.parametrize("seed", range(4))
def test_fold_of_a_wrapped_window_whose_run_crosses_the_wrap(seed: int) -> None:
    # size 5, steps 0-2 under A (slots 0-2), steps 3-6 under B (slots 3, 4, 0,
    # 1): B's steps are two runs, split by the wrap, around A's slot 2
    window, history = _run_window(seed, 5, commits_before=[3], steps=7)
    assert window._version_of_step == [1, 1, 0, 1, 1]
    assert [n for _, n in window._runs(range(window.window_size))] == [2, 1, 2]
    _assert_matches_reference(window, history)


@pytest.mark.parametrize("seed", range(4))
def test_fold_with_never_written_slots_beside_written_ones(seed: int) -> None:
    # 6 of 10 slots written under 3 versions; slots 6-9 never written
    window, history = _run_window(seed, 10, commits_before=[2, 4], steps=6)
    assert window._version_of_step.count(-1) == 4
    assert sum(n for _, n in window._runs(range(window.window_size))) == 10
    _assert_matches_reference(window, history)


@pytest.mark.parametrize("steps", [1, 5, 8, 19])  # part-filled, full, wrapped
def test_fold_under_one_version_only(steps: int) -> None:
    window, history = _run_window(steps, 8, commits_before=[], steps=steps)
    assert len(window._runs(range(window.window_size))) == 1
    _assert_matches_reference(window, history)


@pytest.mark.parametrize("seed", range(4))
def test_fold_keeps_each_layer_to_its_own_experts(seed: int) -> None:
    # 4 layers, commits inside a wrapped window; every layer's maps differ
    window, history = _run_window(
        seed, 6, commits_before=[4, 7, 9], steps=11, layers=4, slots=6, experts=4
    )
    _assert_matches_reference(window, history)
    per_layer = window.total().sum(dim=1)
    loads = torch.stack([load for load, _ in history[-6:]]).sum(dim=(0, 2))
    assert torch.equal(per_layer, loads)


def _device_ops(fn) -> list[str]:
    """The torch ops ``fn`` dispatches that run a kernel (views left out)."""

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count() as count:
        fn()
    return count.ops


@pytest.mark.parametrize("versions", [1, 2, 5])
def test_total_is_three_device_ops_whatever_the_versions(versions: int) -> None:
    commits = [3 * k for k in range(1, versions)]
    window, history = _run_window(0, 16, commits_before=commits, steps=16)
    assert len(window._runs(range(window.window_size))) == versions
    ops = _device_ops(window.total)
    if versions == 1:
        assert ops == [
            "aten.zeros.default",
            "aten.sum.dim_IntList",
            "aten.scatter_add_.default",
        ]
    else:
        assert ops == [
            "aten.zeros.default",
            "aten.cat.default",
            "aten.scatter_add_.default",
        ]
    _assert_matches_reference(window, history)


def test_placement_changed_is_no_device_op_the_next_record_snapshots_it() -> None:
    """A commit step only notes the new map; the next step's record takes
    its snapshot, so later in-place changes of the map do not reach it."""
    phy2log = torch.tensor([[0, 1, 1]])
    window = LoadWindow(4, phy2log.clone(), num_logical_experts=2)
    phy2log[0] = torch.tensor([1, 0, 1])  # a commit, in place
    assert _device_ops(lambda: window.placement_changed(phy2log)) == []
    load = torch.tensor([[5, 7, 11]])
    assert len(_device_ops(lambda: window.record(load))) == 2
    assert len(_device_ops(lambda: window.record(load))) == 1
    phy2log[0] = torch.tensor([0, 0, 0])  # a later change, not announced yet
    # both steps ran under [1, 0, 1]: expert 0 got slot 1, expert 1 slots 0, 2
    assert window.total().tolist() == [[2 * 7, 2 * (5 + 11)]]
    with pytest.raises(ValueError, match=r"phy2log of shape \(1, 4\)"):
        window.placement_changed(torch.tensor([[0, 1, 1, 0]]))


def test_start_up_launches_the_folds_ops_and_both_cat_paths() -> None:
    """CUDA loads a kernel at its first launch (tens of ms on an H200 host):
    the window launches what total() uses at start-up, cat with all inputs
    contiguous (CUDA's batched kernel) and with an expanded one (a copy per
    input)."""

    class Seen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: set[str] = set()
            self.cat_inputs_contiguous: set[bool] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            if func is torch.ops.aten.cat.default:
                contiguous = all(t.is_contiguous() for t in args[0])
                self.cat_inputs_contiguous.add(contiguous)
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        LoadWindow(4, torch.tensor([[0, 1, 1], [1, 0, 1]]), num_logical_experts=2)
    window, _ = _run_window(0, 4, commits_before=[2], steps=4)
    used = set(_device_ops(window.total))
    window, _ = _run_window(0, 4, commits_before=[], steps=4)
    used |= set(_device_ops(window.total))
    window, _ = _run_window(0, 4, commits_before=[2], steps=6)
    used |= set(_device_ops(window.prefold))  # wraps: a cat of the ring's ends
    assert used <= seen.ops
    assert seen.cat_inputs_contiguous == {True, False}


def _prefolded_window(
    size: int, steps: int, commits_before: list[int], records_after: int
) -> tuple[LoadWindow, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The window of ``_run_window`` prefolded ``records_after`` steps before
    its end (a run's history is a prefix of a longer run's, same seed)."""
    window, _ = _run_window(0, size, commits_before, steps - records_after)
    window.prefold()
    _, history = _run_window(0, size, commits_before, steps)
    for step in range(steps - records_after, steps):
        load, placement = history[step]
        if step in commits_before:
            window.placement_changed(placement)
        window.record(load)
    return window, history


def _reference(window: LoadWindow, history: list) -> np.ndarray:
    return _reference_total(history, window.window_size, window.num_logical_experts)


@pytest.mark.parametrize(
    ("size", "steps", "commits_before"),
    [
        (12, 12, [3, 5, 9]),  # full, the oldest slot is slot 0
        (12, 29, [14, 20, 27]),  # wrapped: the kept slots cross the ring's end
        (12, 5, [2]),  # not full: unwritten slots are kept too
        (12, 29, [28]),  # a commit between the prefold and the last record
        (12, 29, []),  # one placement
        (1, 7, [3, 6]),  # nothing kept
        (2, 9, [8]),
    ],
)
def test_prefold_then_one_record_is_the_whole_window_in_one_op(
    size: int, steps: int, commits_before: list[int]
) -> None:
    window, history = _prefolded_window(size, steps, commits_before, 1)
    totals: list[torch.Tensor] = []
    assert _device_ops(lambda: totals.append(window.total())) == [
        "aten.scatter_add_.default"
    ]
    np.testing.assert_array_equal(totals[0].numpy(), _reference(window, history))
    # used once: the next total folds the whole window again, same result
    assert len(_device_ops(window.total)) == 3
    _assert_matches_reference(window, history)


@pytest.mark.parametrize("records_after", [0, 2, 3])
def test_a_prefold_not_followed_by_exactly_one_record_is_not_used(
    records_after: int,
) -> None:
    window, history = _prefolded_window(12, 29, [14, 20, 27], records_after)
    assert len(_device_ops(window.total)) == 3
    _assert_matches_reference(window, history)
