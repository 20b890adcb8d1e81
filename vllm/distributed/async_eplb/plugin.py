"""vLLM general plugin: put our ``EplbState`` wherever vLLM uses its own.

Registered as a ``vllm.general_plugins`` entry point, so vLLM calls
:func:`register` in every process (engine core and workers) before it builds a
model runner; ``vllm serve MODEL --enable-expert-parallel --enable-eplb`` then
runs async_eplb with no code change. ``VLLM_ASYNC_EPLB=0`` turns it off.

vLLM's modules bind ``EplbState`` by ``from ... import EplbState``, so the
plugin rebinds the name in vLLM's defining module (for modules imported later)
and in every module already imported that holds vLLM's class. With elastic EP
(out of our scope) the class builds vLLM's own ``EplbState`` instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from vllm.distributed.async_eplb.config import plugin_enabled
from vllm.distributed.async_eplb.eplb_state import EplbState

__all__ = ["VLLM_MODULES", "VllmEplbState", "register"]

logger = logging.getLogger(__name__)

_VLLM_STATE_MODULE = "vllm.distributed.eplb.eplb_state"
VLLM_MODULES = (
    _VLLM_STATE_MODULE,
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.eplb_utils",
    "vllm.v1.worker.gpu.spec_decode.speculator",
    "vllm.v1.spec_decode.extract_hidden_states",
    "vllm.v1.spec_decode.llm_base_proposer",
    "vllm.model_executor.layers.fused_moe.routed_experts",
)
"""Modules of vLLM 0.32 that import ``EplbState`` (what the test checks)."""


class VllmEplbState(EplbState):
    """Ours, except under elastic EP, where vLLM's own ``EplbState`` is built."""

    vllm_eplb_state: type | None = None

    def __new__(cls, parallel_config: Any, device: Any, **kwargs: Any) -> Any:
        if getattr(parallel_config, "enable_elastic_ep", False):
            assert cls.vllm_eplb_state is not None
            logger.info("elastic EP is on: using vLLM's own EplbState")
            return cls.vllm_eplb_state(parallel_config, device)
        return super().__new__(cls)


def register() -> None:
    """Entry point: rebind ``EplbState`` in vLLM's modules (idempotent)."""
    if not plugin_enabled():
        logger.info("VLLM_ASYNC_EPLB=0: keeping vLLM's EplbState")
        return
    import importlib

    source = importlib.import_module(_VLLM_STATE_MODULE)
    original = source.EplbState
    if isinstance(original, type) and issubclass(original, EplbState):
        original = VllmEplbState.vllm_eplb_state
    VllmEplbState.vllm_eplb_state = original
    replaced = []
    for name, module in list(sys.modules.items()):
        if (
            name.startswith("vllm.")
            and not name.startswith("vllm.distributed.async_eplb")
            and getattr(module, "EplbState", None) is original
        ):
            module.EplbState = VllmEplbState
            replaced.append(name)
    logger.info("async_eplb: EplbState replaced in %s", ", ".join(sorted(replaced)))
