"""What the parts of one ``EplbState`` share, built at its first ``add_model``.

The round driver, the staging fleet, the sync mover, the balance log and the
shutdown code act on the same EP group, configuration, counters, registered
models, vote and device. They get this one object instead of the façade, so
none of them can reach into another's state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vllm.distributed.async_eplb.agreement import NonBlockingVote
from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.ep_group import EpGroupInfo
from vllm.distributed.async_eplb.model_state import EplbCounters, EplbModelState
from vllm.distributed.async_eplb.plan_thread import PlanRequest
from vllm.distributed.async_eplb.rebalance_plan import (
    PlannedRebalance,
    mean_predicted,
)
from vllm.distributed.async_eplb.replica_check import ReplicaCheck

__all__ = ["EplbParts", "split_flat"]

logger = logging.getLogger(__name__)


def split_flat(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Cut a vote's flat payload back into one tensor per model."""
    out, offset = [], 0
    for shape in shapes:
        size = int(torch.Size(shape).numel())
        out.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return out


@dataclass
class EplbParts:
    """The EP group, config, counters, models, vote and device of one
    ``EplbState``; ``models`` is the façade's ``model_states`` dict itself."""

    ep: EpGroupInfo
    config: AsyncEplbConfig
    counters: EplbCounters
    models: dict[str, EplbModelState]
    device: torch.device
    backend: DeviceBackend
    vote: NonBlockingVote
    replica_check: ReplicaCheck
    recorder: Any = None
    """``VLLM_ASYNC_EPLB_RECORD``'s recorder (EP rank 0 only), else None."""

    @property
    def states(self) -> list[EplbModelState]:
        return list(self.models.values())

    def layers_per_model(self) -> list[int]:
        return [s.model.num_moe_layers for s in self.models.values()]

    def plan_request(
        self,
        loads: list[torch.Tensor],
        placements: list[torch.Tensor] | None = None,
    ) -> PlanRequest:
        """The planner's input: CPU copies, so commits cannot change it.

        ``placements``: each model's ``phy2log`` as the load was summed under
        (host copies); by default read from the maps.
        """
        if self.recorder is not None:  # the first model's load, summed over ranks
            self.recorder.add_window(loads[0])
        states = self.states
        if placements is None:
            placements = [s.maps.phy2log for s in states]
        return PlanRequest.of(
            placements,
            loads,
            [s.model.num_expert_groups for s in states],
            num_ranks=self.ep.world_size,
            ranks_per_node=self.ep.ranks_per_node,
            policy=self.config.policy,
        )

    def gain_too_small(self, plans: list[PlannedRebalance]) -> bool:
        """Notes the predicted balancedness; True below ``min_gain``."""
        old, new = mean_predicted(plans)
        self.counters.last_predicted = (old, new)
        return new - old < self.config.min_gain

    def count_skip(self, step: int) -> None:
        """A rebalance skipped on every rank (its gain was too small)."""
        self.counters.skips += 1
        old, new = self.counters.last_predicted or (float("nan"), float("nan"))
        if self.ep.rank == 0:
            logger.info(
                "async EPLB: skipping rebalance at step %d: predicted balancedness "
                "%.4f -> %.4f, gain below VLLM_ASYNC_EPLB_MIN_GAIN=%.4f",
                step,
                old,
                new,
                self.config.min_gain,
            )
