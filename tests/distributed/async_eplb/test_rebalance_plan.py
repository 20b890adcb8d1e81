"""plan_rebalance: pure, so it is tested without processes."""

from __future__ import annotations

import pytest
import torch

from vllm.distributed.async_eplb.rebalance_plan import mean_predicted, plan_rebalance

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
