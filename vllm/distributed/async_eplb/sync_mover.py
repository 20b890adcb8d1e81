"""Moving experts on the calling thread: sync mode, warm start, profile run.

Sync mode (``use_async=False``) rebalances every layer at once, blocking, as
vLLM's synchronous EPLB does; the warm start moves layers before the first
forward; the profile run stages a worst-case layer so the transport's buffers
exist while vLLM measures memory. All go through the same planner and
transports as async mode, with a barrier where peers may still read old rows.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.eplb_parts import EplbParts, split_flat
from vllm.distributed.async_eplb.model_state import EplbModelState, keep_recent
from vllm.distributed.async_eplb.plan_thread import compute_plans
from vllm.distributed.async_eplb.planner import LayerPlan, plan_layers
from vllm.distributed.async_eplb.rebalance_algo import warm_up
from vllm.distributed.async_eplb.staging import copy_slot_runs, slot_runs

__all__ = ["move_layer_now", "profile_transfer", "rearrange_sync"]

logger = logging.getLogger(__name__)


def _barrier(parts: EplbParts) -> None:
    if parts.vote.group is not None:
        dist.barrier(group=parts.vote.group)


def rearrange_sync(parts: EplbParts, totals: list[torch.Tensor], step: int) -> None:
    """All layers at once, blocking (``use_async=False``)."""
    payload = torch.cat([t.reshape(-1) for t in totals]).to("cpu", torch.int64)
    if parts.vote.group is not None:  # the vote group is gloo
        dist.all_reduce(payload, group=parts.vote.group)
    loads = split_flat(payload, [t.shape for t in totals])
    plans = compute_plans(parts.plan_request(loads))
    if parts.gain_too_small(plans):
        parts.count_skip(step)
        return
    start = time.perf_counter()
    for state, plan in zip(parts.states, plans, strict=True):
        for layer in plan.changed_layers:
            move_layer_now(
                parts, state, layer, plan.plans[layer], plan.new_phy2log[layer]
            )
        if plan.changed_layers:
            state.window.placement_changed(state.maps.phy2log)
    parts.counters.rebalances += 1
    if parts.ep.rank == 0:
        old, new = parts.counters.last_predicted or (0.0, 0.0)
        logger.info(
            "async EPLB (sync mode): rearranged experts in %.3f s "
            "(predicted balancedness %.4f -> %.4f)",
            time.perf_counter() - start,
            old,
            new,
        )


def move_layer_now(
    parts: EplbParts,
    state: EplbModelState,
    layer: int,
    plan: LayerPlan,
    new_row: torch.Tensor | None,
) -> None:
    """Stage one layer on this thread; commit it unless ``new_row`` is None."""
    counters, rank = parts.counters, parts.ep.rank
    start = time.perf_counter()
    buffers = state.buffer.slot(0)
    weights = state.model.expert_weights[layer]
    received = state.transport.stage_layer(
        plan, rank, weights, buffers, packed=state.buffer.packed(0)
    )
    parts.backend.synchronize()
    counters.bytes_moved += int(received)
    keep_recent(counters.staging_seconds, [time.perf_counter() - start])
    _barrier(parts)  # peers may read our old rows until they are done
    if new_row is None:
        return
    start = time.perf_counter()
    changed = plan.ranks[rank].changed_slots
    copy_slot_runs(weights, buffers, slot_runs(changed, changed))
    state.maps.commit_layer(layer, new_row.to(parts.device))
    parts.backend.synchronize()
    keep_recent(counters.commit_seconds, [time.perf_counter() - start])
    counters.layers_committed += 1
    parts.replica_check.committed(state, layer, plan, rank)


def profile_transfer(parts: EplbParts) -> None:
    """Move a worst-case layer into the staging buffer (no commit).

    Every slot changes and every expert comes from another rank, so the
    transport's buffers are allocated while vLLM profiles memory.
    """
    world = parts.ep.world_size
    warm_up(parts.config.policy)  # JIT now, not mid-serving
    # Ranks leave the compilation seconds apart on a cold cache; the profile
    # run may block, so line them up before the transfer, whose waits
    # would otherwise time out on the slowest rank.
    _barrier(parts)
    for state in parts.states:
        old = state.maps.phy2log[0].to("cpu")
        slots = state.model.num_local_physical_experts
        new = torch.roll(old, shifts=slots if world > 1 else 1)
        plan = plan_layers(old[None], new[None], world, parts.ep.ranks_per_node)[0]
        move_layer_now(parts, state, 0, plan, None)
