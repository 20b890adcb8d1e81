"""One model's rebalance, planned: new placement, predicted gain, transfer plans.

Pure (no process group): every rank computes the same plan from the same
summed load, so no plan is ever sent between ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vllm.distributed.async_eplb.load_stats import predicted_balancedness
from vllm.distributed.async_eplb.planner import LayerPlan, plan_layers
from vllm.distributed.async_eplb.rebalance_algo import rebalance_experts

__all__ = [
    "LAYERS_PER_PIECE",
    "PlannedRebalance",
    "hand_back_gil",
    "mean_predicted",
    "plan_rebalance",
]

LAYERS_PER_PIECE = 8
"""Layers the policy places per piece of planning (see ``plan_rebalance``)."""


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


def hand_back_gil() -> None:
    """Let any thread waiting for the GIL take it (``plan_rebalance``'s default
    pause between pieces)."""
    time.sleep(0)


def plan_rebalance(
    old_phy2log: torch.Tensor,
    load: torch.Tensor,
    *,
    num_groups: int,
    num_ranks: int,
    ranks_per_node: int,
    policy: str,
    pause: Callable[[], None] = hand_back_gil,
) -> PlannedRebalance:
    """Placement for ``load`` [L, E] starting from ``old_phy2log`` [L, P].

    Runs as short pieces with ``pause()`` before each: the policy on at most
    ``LAYERS_PER_PIECE`` layers, one layer's transfer plan, one balancedness.
    On the planner thread ``pause`` waits while the engine is inside a step
    (``step_gate.py``), so a step waits at most for the piece in progress.
    DeepSeek-V3 geometry on a 2-core CPU: a layer's transfer plan 0.5-2.8 ms,
    a balancedness 1.2-1.9 ms, the whole plan about 100 ms. Every policy
    places each layer on its own, so the pieces' placement is the one a
    single call would give.
    """
    pause()  # the first piece's copies included: nothing runs inside a step
    old = old_phy2log.to("cpu")
    num_layers = old.shape[0]
    num_nodes = max(1, num_ranks // ranks_per_node)
    weight = load.to(torch.float32)
    pieces = []
    # (at least one call: a model without layers still meets the validation)
    for first in range(0, max(num_layers, 1), LAYERS_PER_PIECE):
        if first:
            pause()
        rows = slice(first, first + LAYERS_PER_PIECE)
        placed = rebalance_experts(
            weight[rows],
            old.shape[1],
            num_groups,
            num_nodes,
            num_ranks,
            old[rows],
            policy=policy,
        )
        pieces.append(
            torch.as_tensor(placed, dtype=torch.int64).reshape(-1, old.shape[1])
        )
    new = torch.cat(pieces).reshape(old.shape)
    plans: list[LayerPlan] = []
    for layer in range(num_layers):
        pause()
        plans += plan_layers(
            old[layer : layer + 1], new[layer : layer + 1], num_ranks, ranks_per_node
        )
    pause()
    old_balancedness = predicted_balancedness(load, old, num_ranks)
    pause()
    new_balancedness = predicted_balancedness(load, new, num_ranks)
    return PlannedRebalance(new, plans, old_balancedness, new_balancedness)


def mean_predicted(plans: Sequence[PlannedRebalance]) -> tuple[float, float]:
    """(old, new) predicted balancedness, averaged over the models."""
    old = sum(p.old_balancedness for p in plans) / len(plans)
    new = sum(p.new_balancedness for p in plans) / len(plans)
    return old, new
