"""plan_rebalance: pure, so it is tested without processes."""

from __future__ import annotations

import time

import pytest
import torch

from vllm.distributed.async_eplb.plan_thread import (
    PlannerThread,
    PlanRequest,
    compute_plans,
)
from vllm.distributed.async_eplb.rebalance_algo import rebalance_experts
from vllm.distributed.async_eplb.rebalance_plan import (
    LAYERS_PER_PIECE,
    mean_predicted,
    plan_rebalance,
)
from vllm.distributed.async_eplb.step_gate import StepGate

LAYERS, EXPERTS, REDUNDANT, RANKS = 3, 8, 4, 4


def _initial() -> torch.Tensor:
    row = list(range(EXPERTS)) + [i % EXPERTS for i in range(REDUNDANT)]
    return torch.tensor(row).expand(LAYERS, -1).clone()


@pytest.mark.parametrize("policy", ["default", "min_migration"])
def test_skewed_load_gains_and_plans_only_changed_layers(policy: str) -> None:
    old = _initial()
    load = torch.ones(LAYERS, EXPERTS)
    load[0, 0] = 50.0  # one hot expert on layer 0
    load[2, :2] = 30.0  # two on layer 2; layer 1 stays uniform
    planned = plan_rebalance(
        old, load, num_groups=1, num_ranks=RANKS, ranks_per_node=2, policy=policy
    )
    assert planned.new_phy2log.shape == old.shape
    assert planned.new_balancedness > planned.old_balancedness
    changed = [
        i for i in range(LAYERS) if not torch.equal(old[i], planned.new_phy2log[i])
    ]
    assert planned.changed_layers == changed
    assert 0 in changed and 2 in changed
    for layer, plan in enumerate(planned.plans):
        assert plan.is_noop == (layer not in changed)
    # Every logical expert keeps a replica.
    for layer in range(LAYERS):
        assert set(planned.new_phy2log[layer].tolist()) == set(range(EXPERTS))


def test_mean_predicted_averages_models() -> None:
    old = _initial()
    load = torch.ones(LAYERS, EXPERTS)
    load[:, 3] = 20.0
    a = plan_rebalance(
        old, load, num_groups=1, num_ranks=RANKS, ranks_per_node=4, policy="default"
    )
    b = plan_rebalance(
        old,
        torch.ones(LAYERS, EXPERTS),
        num_groups=1,
        num_ranks=RANKS,
        ranks_per_node=4,
        policy="default",
    )
    old_mean, new_mean = mean_predicted([a, b])
    assert old_mean == pytest.approx((a.old_balancedness + b.old_balancedness) / 2)
    assert new_mean == pytest.approx((a.new_balancedness + b.new_balancedness) / 2)


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="no_such_policy"):
        plan_rebalance(
            _initial(),
            torch.ones(LAYERS, EXPERTS),
            num_groups=1,
            num_ranks=RANKS,
            ranks_per_node=4,
            policy="no_such_policy",
        )


def _skewed(num_layers: int, experts: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(num_layers, experts, generator=generator) ** 4 * 1e4).round()


@pytest.mark.parametrize(
    "policy", ["default", "balanced", "balanced_spill", "min_migration"]
)
def test_pieces_place_as_one_call_would(policy: str) -> None:
    """Planned in pieces of LAYERS_PER_PIECE layers (issue 13), the placement
    is the policy's whole-model placement, over several pieces and a partial one."""
    num_layers, experts, slots, ranks = 2 * LAYERS_PER_PIECE + 3, 32, 40, 8
    old = rebalance_experts(torch.ones(num_layers, experts), slots, 4, 2, ranks)
    for seed in range(3):
        load = _skewed(num_layers, experts, seed)
        whole = rebalance_experts(load, slots, 4, 2, ranks, old, policy=policy)
        planned = plan_rebalance(
            old, load, num_groups=4, num_ranks=ranks, ranks_per_node=4, policy=policy
        )
        assert torch.equal(planned.new_phy2log, torch.as_tensor(whole).view(old.shape))


def test_pause_runs_before_every_piece() -> None:
    num_layers = LAYERS_PER_PIECE + 1
    old = _initial()[:1].expand(num_layers, -1).clone()
    calls = []
    plan_rebalance(
        old,
        _skewed(num_layers, EXPERTS, 0),
        num_groups=1,
        num_ranks=RANKS,
        ranks_per_node=2,
        policy="default",
        pause=lambda: calls.append(1),
    )
    # 2 policy pieces, one per layer's transfer plan, 2 balancedness figures
    assert len(calls) == 2 + num_layers + 2


def test_planner_thread_waits_out_a_step_in_progress() -> None:
    """While the gate is closed (a step runs) the planner parks; it finishes
    once the step ends, with the plan it would have made anyway."""
    old = _initial()
    load = _skewed(LAYERS, EXPERTS, 1)
    request = PlanRequest.of(
        [old], [load], [1], num_ranks=RANKS, ranks_per_node=2, policy="default"
    )
    gate = StepGate(max_wait_s=30.0)
    planner = PlannerThread("test-plan", gate=gate)
    try:
        gate.close()
        future = planner.submit(request)
        time.sleep(0.3)
        assert not future.done()
        gate.open()
        (planned,) = future.result(timeout=30)
    finally:
        planner.stop(timeout=5)
    (expected,) = compute_plans(request)
    assert torch.equal(planned.new_phy2log, expected.new_phy2log)
