"""torchrun script (2 ranks): our EplbState with vLLM's own objects.

vLLM's ``ParallelConfig``/``EPLBConfig``, its parallel state on gloo (the EP
group comes from ``get_ep_group()``), the ``MixtureOfExperts`` protocol check
and per-layer ``EplbLayerState`` objects, driven like the model runner.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from vllm.config import EPLBConfig, ParallelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed.eplb.eplb_state import EplbLayerState
from vllm.distributed.parallel_state import (
    get_ep_group,
    init_distributed_environment,
    initialize_model_parallel,
)
from vllm.model_executor.models.interfaces import (
    MixtureOfExperts,
    is_mixture_of_experts,
)

from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.eplb_state import EplbState
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE


class ModelConfigStub:
    """What EplbState reads of vLLM's ModelConfig: a hash and a name."""

    model = "toy-vllm"

    def compute_hash(self) -> str:
        return "toy-vllm-hash"


class VllmToyMoE(ToyMoE, MixtureOfExperts):
    """The toy declared a ``MixtureOfExperts``, as vLLM's model classes are:
    vLLM's check then holds before ``set_eplb_state`` creates ``expert_weights``."""


def attach_layer_states(model: ToyMoE) -> None:
    """Give each toy layer a real vLLM ``EplbLayerState``, as FusedMoE has."""
    for layer in model.moe_layers:
        layer.eplb_state = EplbLayerState()
        plain = layer.set_eplb_state

        def set_state(
            moe_layer_idx,
            expert_load_view,
            logical_to_physical_map,
            logical_replica_count,
            layer=layer,
            plain=plain,
        ):
            args = (
                moe_layer_idx,
                expert_load_view,
                logical_to_physical_map,
                logical_replica_count,
            )
            plain(*args)
            layer.eplb_state.set_layer_state(*args)

        layer.set_eplb_state = set_state


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    parallel_config = ParallelConfig(
        tensor_parallel_size=world, enable_expert_parallel=True
    )
    with set_current_vllm_config(VllmConfig(parallel_config=parallel_config)):
        init_distributed_environment(
            world, rank, "env://", int(os.environ["LOCAL_RANK"]), backend="gloo"
        )
        initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
    # vLLM accepts enable_eplb=True only on CUDA/ROCm/XPU: set after validation.
    parallel_config.eplb_config = EPLBConfig(
        window_size=4, step_interval=8, num_redundant_experts=2, use_async=True
    )
    parallel_config.enable_eplb = True
    assert get_ep_group().world_size == world

    model = VllmToyMoE(2, 8, 2, world, rank, hidden_size=8, top_k=2)
    attach_layer_states(model)
    assert is_mixture_of_experts(model)
    assert not hasattr(model, "expert_weights")  # until set_eplb_state
    state = EplbState(
        parallel_config, torch.device("cpu"), config=AsyncEplbConfig(min_gain=0.0)
    )
    model_config = ModelConfigStub()
    state.add_model(model, model_config)
    for index, layer in enumerate(model.moe_layers):
        ls = layer.eplb_state
        assert ls.should_record_tensor is state.should_record_tensor
        assert ls.num_unpadded_tokens_tensors is not None
        ms = state.model_states["toy-vllm-hash"]
        assert ls.logical_to_physical_map.data_ptr() == (
            ms.logical_to_physical_map[index].data_ptr()
        )
    state.step(is_dummy=True, is_profile=True)
    state.start_async_loop()
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        probs = torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1])
        ids = torch.stack(
            [torch.multinomial(probs.expand(32, -1), 2, generator=gen)] * 2
        )
        state.prepare_forward(model_config, 32)
        assert torch.equal(model.forward(ids), model.reference_forward(ids)), step
        state.step(is_dummy=step % 5 == 4, log_stats=True)
    assert state.counters.rebalances >= 1, state.counters
    assert state.counters.aborts == 0, state.counters
    print(f"VLLM OK rank {rank} {state.counters.rebalances}", flush=True)
    state.shutdown()
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
