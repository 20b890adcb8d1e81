"""Check that replicas hold their expert's weights; heal them at start-up.

At ``add_model`` (before the first forward, before any vote is in flight):
every rank digests its slots on the device, the ``[layers, slots]`` digests
are all-gathered on the EPLB vote group, and every replica whose digest
differs from its expert's primary slot is named in one warning and, unless
``VLLM_ASYNC_EPLB_HEAL_REPLICAS=0``, copied from the slots that hold the
expert, with the model's own transport (one plan per layer from "what the
slots hold" to "what the maps say"). Every rank reaches the same verdict
from the same gathered digests, so all take part in the transfers.

After each commit (``VLLM_ASYNC_EPLB_CHECK_AFTER_REBALANCE``): the changed
slots of the committed layer are digested on the forward stream and copied
to pinned host memory; a later ``step`` compares them, once the device is
done, with the digests recorded at start-up. No collective and no wait: a
serving step never blocks on it. Expert weights are assumed not to change
while serving (a weight reload would make the recorded digests stale).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.config import ENV_PREFIX, AsyncEplbConfig
from vllm.distributed.async_eplb.consistency import (
    StaleReplica,
    describe_stale,
    expected_digests,
    find_stale_replicas,
    slot_digests,
    source_row,
    weights_digests,
)
from vllm.distributed.async_eplb.planner import LayerPlan, plan_layer
from vllm.distributed.async_eplb.staging import copy_slot_runs, slot_runs

__all__ = [
    "CommitMismatch",
    "ReplicaCheck",
    "StartupReport",
    "gather_digests",
    "local_slot_digests",
]

logger = logging.getLogger(__name__)


def gather_digests(
    local: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """``[L, S]`` digests of this rank -> ``[L, P]`` of all ranks, on the host.

    A blocking all-gather on ``group`` (the EPLB vote group, gloo); only
    digests travel, never weights. ``group`` None: a single rank.
    """
    local = local.to("cpu", torch.int64).contiguous()
    if group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=1)


def local_slot_digests(
    weights: Sequence[torch.Tensor], slots: Sequence[int]
) -> torch.Tensor:
    """Digests of local ``slots`` of one layer, in ascending slot order.

    Runs of consecutive slots are digested as slices: no weights are copied.
    """
    parts = [
        slot_digests([w[start : start + n] for w in weights])
        for start, _, n in slot_runs(slots, slots)
    ]
    return torch.cat(parts)


@dataclass(frozen=True)
class StartupReport:
    """What the start-up check of one model found and did on this rank."""

    model_name: str
    stale: tuple[StaleReplica, ...]
    healed: bool
    bytes_received: int
    check_seconds: float
    """Digests computed and gathered (the part every model pays)."""
    heal_seconds: float


@dataclass(frozen=True)
class CommitMismatch:
    """A committed slot whose digest is not its expert's (after a rebalance)."""

    model_name: str
    layer: int
    slot: int
    """Global physical slot."""
    expert: int


@dataclass
class _Pending:
    state: Any
    layer: int
    slots: list[int]  # global physical slots
    experts: list[int]
    digests: torch.Tensor  # host, filled once ``event`` is done
    event: Any


def _slot_experts(plan: LayerPlan, rank: int) -> dict[int, int]:
    """Local slot -> expert it receives, for every changed slot of ``rank``."""
    rank_plan = plan.ranks[rank]
    moves = [*rank_plan.local_copies, *rank_plan.receives]
    return {slot: move.expert for move in moves for slot in move.dst_slots}


class ReplicaCheck:
    """The start-up check and heal of every model, and the commit check."""

    def __init__(self, config: AsyncEplbConfig) -> None:
        self.heal = config.heal_replicas
        after = config.check_after_rebalance
        # Unset: on when our logger shows debug output (VLLM_LOGGING_LEVEL=DEBUG).
        self.after_rebalance = (
            logger.isEnabledFor(logging.DEBUG) if after is None else after
        )
        self.reports: dict[str, StartupReport] = {}
        self.mismatches: list[CommitMismatch] = []
        self.slots_checked = 0
        """Committed slots compared after rebalances on this rank."""
        self._expected: dict[int, tuple[Any, torch.Tensor]] = {}
        self._pending: deque[_Pending] = deque()
        self._backend: Any = None

    # -- start-up ------------------------------------------------------------
    def at_add_model(
        self, state: Any, ep: Any, group: dist.ProcessGroup | None, backend: Any
    ) -> StartupReport:
        """Check ``state``'s model; heal stale replicas unless turned off.

        Collective over the EP group (``group``): every rank calls it in
        ``add_model``, after the staging buffer and transport exist.
        """
        start = time.perf_counter()
        self._backend = backend
        model = state.model
        num_logical = model.num_logical_experts
        digests = gather_digests(weights_digests(model.expert_weights), group)
        phy2log = state.maps.phy2log.to("cpu", torch.int64)
        stale = find_stale_replicas(phy2log, digests, num_logical)
        expected = expected_digests(phy2log, digests, num_logical)
        self._expected[id(state)] = (state, expected)
        check_seconds = time.perf_counter() - start
        received = 0
        if stale and ep.rank == 0:
            self._warn(state.model_name, stale)
        start = time.perf_counter()
        if stale and self.heal:
            received = self._heal(state, stale, ep, group, backend)
            self._verify(state, stale, expected, ep, group)
        report = StartupReport(
            state.model_name,
            tuple(stale),
            bool(stale) and self.heal,
            received,
            check_seconds,
            time.perf_counter() - start,
        )
        self.reports[state.model_name] = report
        return report

    def _warn(self, model_name: str, stale: Sequence[StaleReplica]) -> None:
        action = (
            "copying them from the slots that hold each expert before the first "
            f"forward (set {ENV_PREFIX}_HEAL_REPLICAS=0 to leave them)"
            if self.heal
            else "tokens routed to them are computed with the wrong weights "
            f"({ENV_PREFIX}_HEAL_REPLICAS=0: not healed)"
        )
        logger.warning(
            "async EPLB: model %s: %d expert replica slot(s) do not hold the "
            "weights of their logical expert's primary slot (%s); the model's "
            "weight loader did not fill them; %s",
            model_name,
            len(stale),
            describe_stale(stale),
            action,
        )

    def _heal(
        self,
        state: Any,
        stale: Sequence[StaleReplica],
        ep: Any,
        group: dist.ProcessGroup | None,
        backend: Any,
    ) -> int:
        """Copy each stale slot's expert into it; bytes this rank received."""
        by_layer: dict[int, list[int]] = {}
        for replica in stale:
            by_layer.setdefault(replica.layer, []).append(replica.slot)
        phy2log = state.maps.phy2log.to("cpu", torch.int64)
        num_logical = state.model.num_logical_experts
        # Peers read our healthy rows: every loader must be done everywhere.
        backend.synchronize()
        if group is not None:
            dist.barrier(group=group)
        received = 0
        buffers = state.buffer.slot(0)
        for layer, slots in sorted(by_layer.items()):
            row = phy2log[layer].tolist()
            plan = plan_layer(
                source_row(row, slots, num_logical),
                row,
                ep.world_size,
                ep.ranks_per_node,
            )
            weights = state.model.expert_weights[layer]
            received += state.transport.stage_layer(
                plan, ep.rank, weights, buffers, packed=state.buffer.packed(0)
            )
            changed = plan.ranks[ep.rank].changed_slots
            copy_slot_runs(weights, buffers, slot_runs(changed, changed))
            backend.synchronize()  # the buffer is reused by the next layer
        return int(received)

    def _verify(
        self,
        state: Any,
        stale: Sequence[StaleReplica],
        expected: torch.Tensor,
        ep: Any,
        group: dist.ProcessGroup | None,
    ) -> None:
        """Every healed slot now digests to its expert's; else raise, all ranks."""
        slots_per_rank = state.model.num_local_physical_experts
        first = ep.rank * slots_per_rank
        wrong = []
        for replica in stale:
            local = replica.slot - first
            if not 0 <= local < slots_per_rank:
                continue
            weights = state.model.expert_weights[replica.layer]
            got = int(local_slot_digests(weights, [local])[0])
            if got != int(expected[replica.layer, replica.expert]):
                wrong.append(replica)
        count = torch.tensor([len(wrong)], dtype=torch.int64)
        if group is not None:
            dist.all_reduce(count, group=group)
        if int(count[0]):
            raise RuntimeError(
                f"async EPLB: model {state.model_name}: {int(count[0])} replica "
                f"slot(s) still differ from their expert after healing "
                f"(this rank: {describe_stale(wrong)})"
            )

    # -- after commits -----------------------------------------------------------
    def committed(self, state: Any, layer: int, plan: LayerPlan, rank: int) -> None:
        """Digest ``layer``'s changed slots of this rank on the current stream.

        Called right after the layer's commit, on the stream that committed
        it; the result is read by a later :meth:`poll`, never waited for.
        """
        if not self.after_rebalance or id(state) not in self._expected:
            return
        experts = _slot_experts(plan, rank)
        if not experts:
            return
        local = sorted(experts)
        weights = state.model.expert_weights[layer]
        digests = local_slot_digests(weights, local)
        backend = self._backend
        host = backend.empty_pinned(tuple(digests.shape), torch.int64)
        host.copy_(digests, non_blocking=True)
        event = backend.new_event()
        backend.record_event(event)
        first = rank * plan.slots_per_rank
        self._pending.append(
            _Pending(
                state,
                layer,
                [first + s for s in local],
                [experts[s] for s in local],
                host,
                event,
            )
        )
        if backend.is_synchronous:
            self.poll()

    def poll(self) -> None:
        """Compare the commit digests the device has finished; log mismatches."""
        while self._pending:
            item = self._pending[0]
            if not self._backend.event_done(item.event):
                return
            self._pending.popleft()
            _, expected = self._expected[id(item.state)]
            want = expected[item.layer, item.experts]
            bad = (item.digests != want).nonzero().flatten().tolist()
            self.slots_checked += len(item.slots)
            found = [
                CommitMismatch(
                    item.state.model_name,
                    item.layer,
                    item.slots[i],
                    item.experts[i],
                )
                for i in bad
            ]
            if found:
                self.mismatches += found
                logger.error(
                    "async EPLB: model %s: after a rebalance, MoE layer %d slots "
                    "%s do not hold the weights of experts %s",
                    item.state.model_name,
                    item.layer,
                    [m.slot for m in found],
                    [m.expert for m in found],
                )
