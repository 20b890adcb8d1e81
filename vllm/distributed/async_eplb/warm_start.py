"""Warm start: ``VLLM_ASYNC_EPLB_INIT_PLACEMENT``'s placement, agreed by every rank.

At ``add_model`` every EP rank reads the same file, turns it into a target
placement (taken as given, or computed from its load with the configured
policy, starting from the initial placement so that experts stay where they
can) and plans the transfers from the initial placement. The ranks then agree
before anything moves: if any rank refused the file, every rank raises; if
they read different placements (a different file on each node), every rank
raises. Only then does ``EplbState`` move the layers through its normal
transports, before the first forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.ep_group import EpGroupInfo
from vllm.distributed.async_eplb.load_stats import predicted_balancedness
from vllm.distributed.async_eplb.placement_files import (
    Geometry,
    PlacementFileError,
    read_placement_file,
    warm_start_input,
)
from vllm.distributed.async_eplb.planner import LayerPlan, plan_layers
from vllm.distributed.async_eplb.rebalance_plan import plan_rebalance

__all__ = ["WarmStart", "agreed_warm_start", "geometry_of", "plan_warm_start"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmStart:
    """Target placement ``[L, P]`` and the transfers from the initial one."""

    target: torch.Tensor
    plans: list[LayerPlan]
    description: str

    @property
    def changed_layers(self) -> list[int]:
        return [i for i, p in enumerate(self.plans) if not p.is_noop]


def geometry_of(model: Any, model_name: str, num_ranks: int) -> Geometry:
    """The geometry a file must fit, from a vLLM ``MixtureOfExperts`` model."""
    return Geometry(
        model_name=model_name,
        num_layers=model.num_moe_layers,
        num_logical_experts=model.num_logical_experts,
        num_physical_experts=model.num_physical_experts,
        num_ranks=num_ranks,
    )


def plan_warm_start(
    path: str,
    geometry: Geometry,
    initial: torch.Tensor,
    *,
    num_groups: int,
    ranks_per_node: int,
    policy: str,
) -> WarmStart:
    """Read, check and plan (pure; raises ``PlacementFileError``, one line)."""
    source = read_placement_file(path)
    kind, value = warm_start_input(source, geometry)
    initial = initial.to("cpu", torch.int64)
    if kind == "placement":
        plans = plan_layers(initial, value, geometry.num_ranks, ranks_per_node)
        return WarmStart(value, plans, f"{source.kind} placement from {path}")
    try:
        planned = plan_rebalance(
            initial,
            value,
            num_groups=num_groups,
            num_ranks=geometry.num_ranks,
            ranks_per_node=ranks_per_node,
            policy=policy,
        )
    except ValueError as exc:  # the policy refused the load or the geometry
        raise PlacementFileError(f"{path} cannot be placed: {exc}") from None
    predicted = predicted_balancedness(value, planned.new_phy2log, geometry.num_ranks)
    description = (
        f"{source.kind} load from {path}, placed by policy {policy} "
        f"(predicted balancedness {predicted:.4f})"
    )
    return WarmStart(planned.new_phy2log, planned.plans, description)


def agreed_warm_start(
    path: str,
    geometry: Geometry,
    initial: torch.Tensor,
    ep: EpGroupInfo,
    group: dist.ProcessGroup | None,
    *,
    num_groups: int,
    ranks_per_node: int,
    policy: str,
) -> WarmStart:
    """:func:`plan_warm_start` on every rank, then agreement (a collective).

    ``group`` is a CPU (gloo) group of the EP ranks; None on a single rank.
    """
    error: str | None = None
    start: WarmStart | None = None
    try:
        start = plan_warm_start(
            path,
            geometry,
            initial,
            num_groups=num_groups,
            ranks_per_node=ranks_per_node,
            policy=policy,
        )
    except PlacementFileError as exc:
        error = str(exc)
    if group is None:
        if error is not None:
            raise PlacementFileError(error)
        assert start is not None
        return start
    failed = torch.tensor([int(error is not None)])
    dist.all_reduce(failed, group=group)
    if error is not None:
        raise PlacementFileError(error)
    if int(failed) > 0:
        raise PlacementFileError(
            f"{path} was refused on {int(failed)} other EP rank(s); see their logs"
        )
    assert start is not None
    theirs = start.target.clone()
    dist.broadcast(theirs, src=ep.ranks[0], group=group)
    differ = torch.tensor([int(not torch.equal(theirs, start.target))])
    dist.all_reduce(differ, group=group)
    if int(differ) > 0:
        raise PlacementFileError(
            f"{path} gives a different placement on {int(differ)} EP rank(s) "
            "than on EP rank 0 (a different file on each node?)"
        )
    return start
