"""Load window, attribution under the map in force, balancedness, predicted gain."""

from __future__ import annotations

import pytest
import torch

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
