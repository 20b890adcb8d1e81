"""torchrun script: EplbState driving the toy MoE as vLLM's model runner drives it.

Checks on every rank, at every step (mid-rebalance included): the output equals
the unmoved reference bit for bit; no blocking collective runs inside
``step()`` in async mode; at the end: balancedness rose, every layer reached
the planned placement, the workspace holds what the maps say, and all ranks
agree on the maps and on the steps at which layers committed.

Usage: eplb_state_toy.py --mode async|sync [--fail-planning-rank R] [--out-dir D]
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

from vllm.distributed.async_eplb import plan_thread
from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.eplb_state import EpGroupInfo, EplbState
from vllm.distributed.async_eplb.simulation.collectives import CollectiveCounter
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE

LAYERS, EXPERTS, REDUNDANT, TOKENS, TOP_K = 3, 16, 4, 64, 2


def routing(step: int, phase_len: int) -> torch.Tensor:
    return zipf_routing(step, phase_len, LAYERS, EXPERTS, TOKENS, TOP_K)


def global_balancedness(model: ToyMoE, ids: torch.Tensor) -> float:
    """Mean/max tokens per rank for ``ids`` under the current maps (no comms)."""
    slots = model.num_local_physical_experts
    means, maxes = 0.0, 0.0
    token = torch.arange(ids.shape[1]).unsqueeze(1)
    for layer in range(LAYERS):
        moe_layer = model.moe_layers[layer]
        counts = moe_layer.logical_replica_count[ids[layer]]
        phys = moe_layer.logical_to_physical_map[ids[layer], token % counts]
        per_rank = torch.bincount(phys.reshape(-1) // slots, minlength=model.num_ranks)
        means += per_rank.float().mean().item()
        maxes += per_rank.max().item()
    return means / maxes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("async", "sync"), default="async")
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--fail-planning-rank", type=int, default=-1)
    parser.add_argument("--fail-staging-rank", type=int, default=-1)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--out-dir", default="", help="writes rank<r>.json there")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(message)s")
    torch.manual_seed(0)
    eplb_config = SimpleNamespace(
        window_size=8,
        step_interval=10,
        num_redundant_experts=REDUNDANT,
        log_balancedness=True,
        log_balancedness_interval=5,
        use_async=args.mode == "async",
        policy="default",
    )
    parallel_config = SimpleNamespace(
        eplb_config=eplb_config, enable_elastic_ep=False, num_ubatches=0
    )
    model_config = SimpleNamespace(model="toy", compute_hash=lambda: "toy-hash")
    model = ToyMoE(
        LAYERS,
        EXPERTS,
        REDUNDANT,
        world,
        rank,
        hidden_size=16,
        top_k=TOP_K,
        dtype=torch.bfloat16,
    )
    config = AsyncEplbConfig(min_gain=0.02, vote_delay=2, timeout_s=args.timeout)
    state = EplbState(
        parallel_config,
        "cpu",
        ep_group=EpGroupInfo.whole_world(ranks_per_node=2),
        config=config,
    )
    state.add_model(model, model_config)
    ms = state.model_states["toy-hash"]

    if args.fail_planning_rank == rank:
        original = plan_thread.compute_plans
        calls = {"n": 0}

        def failing(request, *args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected placement failure")
            return original(request, *args)

        plan_thread.compute_plans = failing  # what the planner thread runs

    if args.fail_staging_rank == rank:
        transport = ms.transport
        real_stage = transport.stage_layer
        staged = {"n": 0}

        def failing_stage(*a, **k):
            staged["n"] += 1
            # call 1 is the profile run; 3 is the second layer of the first job
            if staged["n"] == 3:
                raise RuntimeError("injected staging failure")
            return real_stage(*a, **k)

        transport.stage_layer = failing_stage

    # The runner: profile run (dummy, is_profile), then start the loop.
    state.step(is_dummy=True, is_profile=True)
    state.start_async_loop()

    counter = CollectiveCounter()  # armed around each step()
    uninstall = counter.install()
    blocking_in_step = 0
    commit_log, mid_rebalance_steps = [], 0
    target, converged = None, 0
    early_bal, late_bal = [], []
    phase_len = 30
    for step in range(args.steps):
        ids = routing(step, phase_len)
        dummy = step % 7 == 3
        state.prepare_forward(model_config, TOKENS)
        out = model.forward(ids)
        ref = model.reference_forward(ids)
        assert torch.equal(out, ref), f"rank {rank} step {step}: output differs"
        if not dummy:
            bal = global_balancedness(model, ids)
            if step % phase_len < 3:
                early_bal.append(bal)  # hot set just changed: old placement
            elif step % phase_len >= 20:
                late_bal.append(bal)  # rebalanced for this hot set
        before = state.counters.layers_committed
        rebalances = state.counters.rebalances
        counter.armed = True
        state.step(is_dummy=dummy, log_stats=True)
        counter.armed = False
        blocking_in_step += counter.take()
        if state.counters.layers_committed != before:
            commit_log.append((step, state.counters.layers_committed - before))
        if state._round.plans and state._round.pending:
            plan, pending = state._round.plans[0], state._round.pending[0]
            target = plan.new_phy2log.clone()
            if pending and len(pending) < len(plan.changed_layers):
                mid_rebalance_steps += 1
        if state.counters.rebalances != rebalances and args.mode == "async":
            assert target is not None
            assert torch.equal(ms.maps.phy2log, target), "not converged to the plan"
            converged += 1
    uninstall()

    # Workspace holds what the maps say, on every layer.
    slots = model.num_local_physical_experts
    for layer in range(LAYERS):
        expected = ms.maps.phy2log[layer, rank * slots : (rank + 1) * slots].tolist()
        assert model.slot_experts(layer) == expected, f"layer {layer} workspace"
    # All ranks agree on the maps and on when layers committed.
    gathered = [None] * world
    dist.all_gather_object(
        gathered, (ms.maps.phy2log.tolist(), commit_log, state.counters.aborts)
    )
    assert all(g == gathered[0] for g in gathered), "ranks disagree"

    c = state.counters
    result = {
        "mode": args.mode,
        "rank": rank,
        "rebalances": c.rebalances,
        "skips": c.skips,
        "aborts": c.aborts,
        "layers_committed": c.layers_committed,
        "bytes_moved": c.bytes_moved,
        "blocking_in_step": blocking_in_step,
        "vote_blocking_waits": state._parts.vote.blocking_waits,
        "mid_rebalance_steps": mid_rebalance_steps,
        "converged": converged,
        "early_balancedness": sum(early_bal) / len(early_bal),
        "late_balancedness": sum(late_bal) / len(late_bal),
        "predicted": c.last_predicted,
        "abort_cause": c.last_abort_cause,
        "commit_log": commit_log,
    }
    print("RESULT", json.dumps(result), flush=True)
    if args.out_dir:
        with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    state.shutdown()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
