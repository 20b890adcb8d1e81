"""Registering one MoE model: its maps, load window, staging buffer, and the
placement it starts from (warm start) and records (``VLLM_ASYNC_EPLB_RECORD``).

``EplbState.add_model`` calls these in vLLM's protocol order: the model's
``expert_weights`` exist only once ``set_eplb_state`` has run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.eplb_parts import EplbParts
from vllm.distributed.async_eplb.load_stats import LoadWindow
from vllm.distributed.async_eplb.maps import ExpertMaps, max_replicas_for
from vllm.distributed.async_eplb.model_state import (
    EplbModelState,
    check_registered_weights,
)
from vllm.distributed.async_eplb.recording import LoadRecorder, recording_meta
from vllm.distributed.async_eplb.staging import StagingBuffer
from vllm.distributed.async_eplb.sync_mover import move_layer_now
from vllm.distributed.async_eplb.warm_start import (
    WarmStart,
    agreed_warm_start,
    geometry_of,
)

__all__ = ["new_model_state", "plan_start", "warm_start_and_record"]

logger = logging.getLogger(__name__)


def new_model_state(
    model: Any,
    name: str,
    initial: torch.Tensor,
    layer_weights: list,
    *,
    window_size: int,
    num_ubatches: int,
    should_record: torch.Tensor,
    device: torch.device,
    backend: DeviceBackend,
) -> EplbModelState:
    """Maps, load window and staging buffer of ``model``, handed to it by
    ``set_eplb_state`` (vLLM's protocol) and checked against its layers."""
    maps = ExpertMaps(
        initial,
        model.num_logical_experts,
        max_replicas_for(model.num_redundant_experts),
        device=device,
    )
    load_pass = torch.zeros(
        model.num_moe_layers,
        model.num_physical_experts,
        dtype=torch.int32,
        device=device,
    )
    window = LoadWindow(window_size, maps.phy2log, model.num_logical_experts)
    unpadded = [
        torch.tensor(0, dtype=torch.int32, device=device) for _ in range(num_ubatches)
    ]
    model.set_eplb_state(load_pass, maps.log2phy, maps.logcnt)
    check_registered_weights(model, layer_weights)
    _propagate_shared_tensors(model, should_record, unpadded)
    state = EplbModelState(model, name, maps, load_pass, window, unpadded)
    # Allocated now, before vLLM profiles memory, so the profile sees it.
    state.buffer = StagingBuffer(model.expert_weights[0], backend)
    return state


def _propagate_shared_tensors(
    model: Any, should_record: torch.Tensor, unpadded: list[torch.Tensor]
) -> None:
    """Give vLLM's per-layer ``EplbLayerState`` the shared scalar tensors.

    We record every step (the window is a ring), so the flag stays True.
    """
    for layer in getattr(model, "moe_layers", ()):
        layer_state = getattr(layer, "eplb_state", None)
        if layer_state is not None and hasattr(layer_state, "should_record_tensor"):
            layer_state.should_record_tensor = should_record
            layer_state.num_unpadded_tokens_tensors = unpadded


def plan_start(
    parts: EplbParts, model: Any, name: str, initial: torch.Tensor
) -> WarmStart | None:
    """The agreed target of ``VLLM_ASYNC_EPLB_INIT_PLACEMENT`` (collective).

    Only for the first model: a MoE drafter starts from its loaded placement.
    """
    config = parts.config
    if config.init_placement is None or parts.models:
        return None
    return agreed_warm_start(
        config.init_placement,
        geometry_of(model, name, parts.ep.world_size),
        initial,
        parts.ep,
        parts.vote.group,
        num_groups=model.num_expert_groups,
        ranks_per_node=parts.ep.ranks_per_node,
        policy=config.policy,
    )


def warm_start_and_record(
    parts: EplbParts,
    state: EplbModelState,
    warm: WarmStart | None,
    *,
    window_size: int,
    step_interval: int,
) -> None:
    """Move to the warm-start placement, before the first forward; and, for
    the first model on EP rank 0, start ``VLLM_ASYNC_EPLB_RECORD``."""
    rank = parts.ep.rank
    if warm is not None:
        for layer in warm.changed_layers:
            move_layer_now(parts, state, layer, warm.plans[layer], warm.target[layer])
        state.window.placement_changed(state.maps.phy2log)
        if rank == 0:
            logger.info(
                "async EPLB: warm start from the %s: %d layers moved",
                warm.description,
                len(warm.changed_layers),
            )
    if parts.config.record and not parts.models and rank == 0:
        meta = recording_meta(
            state.model,
            state.model_name,
            parts.ep.world_size,
            policy=parts.config.policy,
            window_size=window_size,
            step_interval=step_interval,
        )
        parts.recorder = LoadRecorder(
            parts.config.record, meta, placement=lambda: state.maps.phy2log
        )
