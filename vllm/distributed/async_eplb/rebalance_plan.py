"""One model's rebalance, planned: new placement, predicted gain, transfer plans.

Pure (no process group): every rank computes the same plan from the same
summed load, so no plan is ever sent between ranks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm.distributed.async_eplb.load_stats import predicted_balancedness
from vllm.distributed.async_eplb.planner import LayerPlan, plan_layers
from vllm.distributed.async_eplb.rebalance_algo import rebalance_experts

__all__ = ["PlannedRebalance", "mean_predicted", "plan_rebalance"]


@dataclass
class PlannedRebalance:
    """One model's planned rebalance, computed off the main thread."""

    new_phy2log: torch.Tensor
    plans: list[LayerPlan]
    old_balancedness: float
    new_balancedness: float

    @property
    def changed_layers(self) -> list[int]:
        return [i for i, p in enumerate(self.plans) if not p.is_noop]


def plan_rebalance(
    old_phy2log: torch.Tensor,
    load: torch.Tensor,
    *,
    num_groups: int,
    num_ranks: int,
    ranks_per_node: int,
    policy: str,
) -> PlannedRebalance:
    """Placement for ``load`` [L, E] starting from ``old_phy2log`` [L, P]."""
    old = old_phy2log.to("cpu")
    num_nodes = max(1, num_ranks // ranks_per_node)
    new = rebalance_experts(
        load.to(torch.float32),
        old.shape[1],
        num_groups,
        num_nodes,
        num_ranks,
        old,
        policy=policy,
    )
    new = torch.as_tensor(new, dtype=torch.int64).reshape(old.shape)
    plans: list[LayerPlan] = []
    for layer in range(old.shape[0]):
        plans += plan_layers(
            old[layer : layer + 1], new[layer : layer + 1], num_ranks, ranks_per_node
        )
        # Hand the GIL back between layers: this runs beside the engine's main
        # thread, which would otherwise wait up to a switch interval.
        time.sleep(0)
    return PlannedRebalance(
        new_phy2log=new,
        plans=plans,
        old_balancedness=predicted_balancedness(load, old, num_ranks),
        new_balancedness=predicted_balancedness(load, new, num_ranks),
    )


def mean_predicted(plans: Sequence[PlannedRebalance]) -> tuple[float, float]:
    """(old, new) predicted balancedness, averaged over the models."""
    old = sum(p.old_balancedness for p in plans) / len(plans)
    new = sum(p.new_balancedness for p in plans) / len(plans)
    return old, new
