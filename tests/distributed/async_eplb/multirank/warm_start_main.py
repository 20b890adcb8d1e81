"""torchrun script: record a run's expert load, or warm-start a run from a file.

Every rank drives the toy MoE through ``EplbState`` as vLLM's runner does and
checks at every step that the output equals the unmoved reference bit for bit.
Before the first step it notes the placement in force (after a warm start:
the file's) and the balancedness of a fixed probe batch under it and under
vLLM's round-robin placement; at the end, the probe's balancedness under the
placement the run reached. Results go to ``rank<r>.json``.

Usage: warm_start_main.py --out-dir D [--record PATH] [--init PATH] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from toy_routing import zipf_routing

from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.eplb_state import EpGroupInfo, EplbState
from vllm.distributed.async_eplb.maps import compute_logical_maps
from vllm.distributed.async_eplb.model_state import initial_row
from vllm.distributed.async_eplb.simulation.runner import routed_balancedness
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE

LAYERS, EXPERTS, REDUNDANT, TOKENS, TOP_K = 3, 16, 4, 64, 2
PHASE = 10_000  # one hot set for the whole run: the recorded load stays valid
PROBE_STEP = 7_777  # a batch no run steps through, drawn from the same routing


def routing(step: int) -> torch.Tensor:
    return zipf_routing(step, PHASE, LAYERS, EXPERTS, TOKENS, TOP_K)


def refuse(state: EplbState, model: ToyMoE, model_config, out_dir: str, rank: int):
    """add_model must refuse the file on every rank and leave the model as found."""
    try:
        state.add_model(model, model_config)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError("the warm-start file was not refused")
    assert not state.model_states and not hasattr(model, "expert_weights")
    first = rank * model.num_local_physical_experts
    for layer, moe_layer in enumerate(model.moe_layers):
        for slot in range(model.num_local_physical_experts):
            expert = (first + slot) % EXPERTS  # vLLM's initial placement
            loaded = [w[slot] for w in moe_layer.weights]
            assert all(
                torch.equal(a, b)
                for a, b in zip(
                    loaded, model.expert_tensors(layer, expert), strict=True
                )
            ), f"layer {layer} slot {slot} changed"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "refused": message}, f)
    state.shutdown()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--record", default=None)
    parser.add_argument("--init", default=None)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--mode", choices=("async", "sync"), default="async")
    parser.add_argument("--expect-refusal", action="store_true")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(message)s")
    eplb_config = SimpleNamespace(
        window_size=8,
        step_interval=10,
        num_redundant_experts=REDUNDANT,
        log_balancedness=False,
        log_balancedness_interval=1,
        use_async=args.mode == "async",
    )
    parallel_config = SimpleNamespace(
        eplb_config=eplb_config, enable_elastic_ep=False, num_ubatches=0
    )
    model_config = SimpleNamespace(model="toy-moe", compute_hash=lambda: "toy-hash")
    model = ToyMoE(LAYERS, EXPERTS, REDUNDANT, world, rank, hidden_size=8, top_k=TOP_K)
    config = AsyncEplbConfig(
        policy="default",
        min_gain=0.0,
        timeout_s=30.0,
        record=args.record,
        init_placement=args.init,
    )
    state = EplbState(
        parallel_config,
        "cpu",
        ep_group=EpGroupInfo.whole_world(ranks_per_node=2),
        config=config,
    )
    if args.expect_refusal:
        refuse(state, model, model_config, args.out_dir, rank)
        return
    state.add_model(model, model_config)
    ms = state.model_states["toy-hash"]
    probe = routing(PROBE_STEP)
    row = torch.tensor(initial_row(EXPERTS, REDUNDANT)).expand(LAYERS, -1)
    rr_log2phy, rr_logcnt = compute_logical_maps(row, EXPERTS)
    start_phy2log = ms.maps.phy2log.tolist()
    start_balancedness = routed_balancedness(
        probe, ms.maps.log2phy, ms.maps.logcnt, world
    )
    round_robin = routed_balancedness(probe, rr_log2phy, rr_logcnt, world)
    round_robin_first = routed_balancedness(routing(0), rr_log2phy, rr_logcnt, world)

    state.step(is_dummy=True, is_profile=True)
    state.start_async_loop()
    first_step_balancedness = None
    for step in range(args.steps):
        ids = routing(step)
        if first_step_balancedness is None:
            first_step_balancedness = routed_balancedness(
                ids, ms.maps.log2phy, ms.maps.logcnt, world
            )
        state.prepare_forward(model_config, TOKENS)
        out = model.forward(ids)
        assert torch.equal(out, model.reference_forward(ids)), f"step {step} differs"
        state.step(is_dummy=False)

    slots = model.num_local_physical_experts
    for layer in range(LAYERS):
        expected = ms.maps.phy2log[layer, rank * slots : (rank + 1) * slots].tolist()
        assert model.slot_experts(layer) == expected, f"layer {layer} workspace"
    result = {
        "rank": rank,
        "start_phy2log": start_phy2log,
        "final_phy2log": ms.maps.phy2log.tolist(),
        "start_balancedness": start_balancedness,
        "first_step_balancedness": first_step_balancedness,
        "round_robin_balancedness": round_robin,
        "round_robin_first_step": round_robin_first,
        "reached_balancedness": routed_balancedness(
            probe, ms.maps.log2phy, ms.maps.logcnt, world
        ),
        "load_votes": state.counters.rebalances + state.counters.skips,
        "aborts": state.counters.aborts,
        "layers_committed": state.counters.layers_committed,
    }
    state.shutdown()
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
