"""Run under torchrun: a target and an MoE drafter on one ``EplbState``.

vLLM's model runner registers the speculative drafter with ``add_model`` too
when it is itself MoE (DeepSeek-V3's MTP layer, EAGLE drafters of MoE models).
Both toys follow vLLM's ``MixtureOfExperts`` protocol; they have the same
expert geometry (vLLM requires it) but their own layers, hidden size, dtype,
weights and load, so each gets its own placements. Every step, on every rank:
both outputs equal their unmoved reference bit for bit. At the end: every
layer's workspace holds what the maps say, and all ranks agree.

``--own-threads`` gives the drafter a staging thread of its own, as before one
thread served every model: the two models' transfers then run at once on the
staging group, which is what corrupted weights (the check must catch it).
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
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE

EXPERTS, REDUNDANT, TOKENS, TOP_K = 16, 4, 64, 2
MODELS = {
    # name: (layers, hidden size, dtype, weight seed, routing phase offset)
    "target": (3, 16, torch.bfloat16, 0, 0),
    "drafter": (1, 16, torch.bfloat16, 7, 291),
}


def model_config(name: str) -> SimpleNamespace:
    return SimpleNamespace(model=name, compute_hash=lambda: f"{name}-hash")


def build(name: str, rank: int, world: int) -> ToyMoE:
    layers, hidden, dtype, seed, _ = MODELS[name]
    return ToyMoE(
        layers,
        EXPERTS,
        REDUNDANT,
        world,
        rank,
        hidden_size=hidden,
        top_k=TOP_K,
        dtype=dtype,
        seed=seed,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--own-threads", action="store_true")
    parser.add_argument("--out-dir", required=True, help="writes rank<r>.json there")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.WARNING, format=f"[rank{rank}] %(message)s")
    eplb_config = SimpleNamespace(
        window_size=6,
        step_interval=12,
        num_redundant_experts=REDUNDANT,
        log_balancedness=False,
        log_balancedness_interval=1,
        use_async=True,
        policy="default",
    )
    parallel_config = SimpleNamespace(
        eplb_config=eplb_config, enable_elastic_ep=False, num_ubatches=0
    )
    config = AsyncEplbConfig(min_gain=0.0, vote_delay=2, timeout_s=30.0)
    state = EplbState(
        parallel_config, "cpu", ep_group=EpGroupInfo.whole_world(), config=config
    )
    models = {name: build(name, rank, world) for name in MODELS}
    for name, model in models.items():
        if args.own_threads and state._fleet is not None:
            state._fleet.thread = None  # the drafter's worker gets its own
        state.add_model(model, model_config(name))
    states = {name: state.model_states[f"{name}-hash"] for name in MODELS}

    state.step(is_dummy=True, is_profile=True)
    state.start_async_loop()
    mismatches = {name: 0 for name in MODELS}
    # Rebalances that changed the model's placement, and layers it committed.
    rebalanced = {name: 0 for name in MODELS}
    moved_this_round = {name: False for name in MODELS}
    phase_len = 40
    for step in range(args.steps):
        before = {n: s.maps.phy2log.clone() for n, s in states.items()}
        for name, model in models.items():
            layers, *_, offset = MODELS[name]
            ids = zipf_routing(step + offset, phase_len, layers, EXPERTS, TOKENS, TOP_K)
            state.prepare_forward(model_config(name), TOKENS)
            if not torch.equal(model.forward(ids), model.reference_forward(ids)):
                mismatches[name] += 1
        rounds = state.counters.rebalances
        state.step(is_dummy=step % 9 == 4)
        for name, s in states.items():
            if not torch.equal(before[name], s.maps.phy2log):
                moved_this_round[name] = True
            if state.counters.rebalances != rounds:
                rebalanced[name] += int(moved_this_round[name])
                moved_this_round[name] = False

    workspace_ok = {}
    for name, model in models.items():
        slots = model.num_local_physical_experts
        phy2log = states[name].maps.phy2log
        workspace_ok[name] = all(
            model.slot_experts(layer)
            == phy2log[layer, rank * slots : (rank + 1) * slots].tolist()
            for layer in range(model.num_moe_layers)
        )
    gathered = [None] * world
    maps = {n: s.maps.phy2log.tolist() for n, s in states.items()}
    dist.all_gather_object(gathered, maps)
    c = state.counters
    result = {
        "rank": rank,
        "mismatches": mismatches,
        "rebalanced": rebalanced,
        "workspace_ok": workspace_ok,
        "ranks_agree": all(g == gathered[0] for g in gathered),
        "rebalances": c.rebalances,
        "aborts": c.aborts,
        "layers_committed": c.layers_committed,
    }
    print("RESULT", json.dumps(result), flush=True)
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    state.shutdown()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
