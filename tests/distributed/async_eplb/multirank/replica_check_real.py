"""torchrun script: vLLM's DeepSeek-V3 + DeepSeek MTP, the drafter's stale slots.

vLLM's ``DeepSeekMTP.load_weights`` builds its expert mapping without
``num_redundant_experts``, so the drafter's redundant slots keep their dummy
values. Per run (``heal``: our default; ``no-heal``:
``VLLM_ASYNC_EPLB_HEAL_REPLICAS=0``), on every rank:

1. build both models with vLLM's own loader (16 routed experts + 2
   redundant slots, 2 ranks) and feed distinct per-expert weights through
   each model's own ``load_weights``;
2. before ``add_model``, run the check's pure part on the gathered digests:
   it must name the drafter's slots 16 and 17 and nothing of the target;
3. drive our ``EplbState`` as ``GPUModelRunner`` does (``add_model``
   drafter first, profile step, ``start_async_loop``, ``prepare_forward`` +
   ``step``) with skewed, drifting load written by the router stand-in;
4. after every step: replicas whose bytes differ from their primary (the
   same digests), and routed slots that do not hold their logical expert's
   original tensors (an independent blake2b digest of every tensor).

Rank 0 prints one ``RESULT {json}`` line per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from real_vllm_models import (
    MODEL_SPECS,
    ModelSpec,
    build_models,
    check_routed_slots,
    load_distinct_experts,
    make_vllm_config,
    route_and_record,
    skewed_topk,
    slot_digests,
)

from vllm.distributed.async_eplb.consistency import (
    find_stale_replicas,
    weights_digests,
)
from vllm.distributed.async_eplb.model_state import initial_row
from vllm.distributed.async_eplb.replica_check import gather_digests

EXPERTS, REDUNDANT, TOKENS, UNPADDED = 16, 2, 48, 40


def deepseek_spec() -> ModelSpec:
    """The tiny DeepSeek-V3 + MTP of the real-model tests, with 16 experts."""
    base = MODEL_SPECS["deepseek_v3_mtp"]
    config = {**base.config, "n_routed_experts": EXPERTS}
    return dataclasses.replace(base, config=config, num_experts=EXPERTS)


def init_parallel(vllm_config: Any, rank: int, world: int) -> None:
    """vLLM's parallel state on gloo, as its CPU worker sets it up."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world, rank, "env://", int(os.environ["LOCAL_RANK"]), backend="gloo"
        )
        ensure_model_parallel_initialized(world, 1)
    _set_torch_accelerator_to_noop()  # the loader's cache emptying, on CPU


def eplb_config(args: argparse.Namespace) -> Any:
    from vllm.config import EPLBConfig

    return EPLBConfig(
        window_size=args.window,
        step_interval=args.interval,
        num_redundant_experts=REDUNDANT,
        log_balancedness=False,
        use_async=True,
    )


def expert_tensors(model: Any) -> list[list[torch.Tensor]]:
    return [list(layer.get_expert_weights()) for layer in model.moe_layers]


def stale_now(model: Any, phy2log: torch.Tensor) -> list[tuple[int, int]]:
    """(layer, slot) of replicas whose bytes differ from their primary."""
    local = weights_digests(expert_tensors(model))
    joined = gather_digests(local, dist.group.WORLD)
    found = find_stale_replicas(phy2log, joined, model.num_logical_experts)
    return [(s.layer, s.slot) for s in found]


def blake_digests(model: Any) -> list:
    """``[layer][global slot]`` blake2b digests of every tensor, all ranks."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, slot_digests(expert_tensors(model)))
    return [
        [slot for rank in parts for slot in rank[layer]]
        for layer in range(len(parts[0]))
    ]


def layer_maps(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    states = [layer.eplb_state for layer in model.moe_layers]
    log2phy = torch.stack([s.logical_to_physical_map for s in states]).cpu()
    logcnt = torch.stack([s.logical_replica_count for s in states]).cpu()
    return log2phy, logcnt


def run(args: argparse.Namespace, heal: bool, workdir: Path) -> dict:
    from vllm.config import set_current_vllm_config

    from vllm.distributed.async_eplb.eplb_state import EplbState

    os.environ["VLLM_ASYNC_EPLB_HEAL_REPLICAS"] = "1" if heal else "0"
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = deepseek_spec()
    vllm_config = make_vllm_config(
        spec, workdir / f"{int(heal)}-r{rank}", world, eplb_config(args)
    )
    built = build_models(vllm_config)
    load_distinct_experts(built, spec, seed=args.seed)
    registered = built.registered()  # drafter first, as vLLM's runner
    initial = torch.tensor(initial_row(EXPERTS, REDUNDANT))
    before = {}
    expected = {}
    for model, _, _ in registered:
        phy2log = initial.expand(model.num_moe_layers, -1)
        before[type(model).__name__] = stale_now(model, phy2log)
        # The loader writes every primary (slot e holds expert e): the
        # original weights of each logical expert.
        expected[id(model)] = [row[:EXPERTS] for row in blake_digests(model)]
    with set_current_vllm_config(vllm_config):
        state = EplbState(vllm_config.parallel_config, torch.device("cpu"))
        start = time.perf_counter()
        for model, config, name in registered:
            state.add_model(model, config, model_name=name)
        add_model_s = time.perf_counter() - start
        state.step(is_dummy=True, is_profile=True)
        state.start_async_loop()
        states = {id(s.model): s for s in state.model_states.values()}
        wrong_replicas, wrong_routed, worst = 0, 0, 0
        for step in range(args.steps):
            for index, (model, config, _) in enumerate(registered[::-1]):
                state.prepare_forward(config, UNPADDED)
                for layer_index, layer in enumerate(model.moe_layers):
                    gen = torch.Generator().manual_seed(
                        ((step * 8 + rank) * 8 + layer_index) * 4 + index
                    )
                    phase = torch.Generator().manual_seed(step // 12 * 97 + layer_index)
                    hot = torch.randperm(EXPERTS, generator=phase)[:4].tolist()
                    ids = skewed_topk(
                        TOKENS,
                        EXPERTS,
                        spec.top_k,
                        hot=hot,
                        generator=gen,
                        num_groups=spec.num_groups,
                        topk_groups=spec.topk_groups,
                    )
                    route_and_record(ids, layer.eplb_state)
            state.step()
            for model, _, _ in registered:
                phy2log = states[id(model)].maps.phy2log.cpu()
                replicas = len(stale_now(model, phy2log))
                log2phy, logcnt = layer_maps(model)
                routed = len(
                    check_routed_slots(
                        expected[id(model)], blake_digests(model), log2phy, logcnt
                    )
                )
                wrong_replicas += replicas
                wrong_routed += routed
                worst = max(worst, replicas, routed)
        reports = state.replica_check.reports
        result = {
            "heal": heal,
            "world": world,
            "classes": [type(m).__name__ for m, _, _ in registered],
            "stale_before_add_model": before,
            "reported": {
                name: [(s.layer, s.slot) for s in r.stale]
                for name, r in reports.items()
            },
            "healed": {name: r.healed for name, r in reports.items()},
            "bytes_received": {name: r.bytes_received for name, r in reports.items()},
            "check_ms": {
                name: round(1000 * r.check_seconds, 2) for name, r in reports.items()
            },
            "heal_ms": {
                name: round(1000 * r.heal_seconds, 2) for name, r in reports.items()
            },
            "add_model_s": round(add_model_s, 3),
            "steps": args.steps,
            "wrong_replica_slot_steps": wrong_replicas,
            "wrong_routed_slot_steps": wrong_routed,
            "worst_step": worst,
            "rebalances": state.counters.rebalances,
            "skips": state.counters.skips,
            "layers_committed": state.counters.layers_committed,
            "aborts": state.counters.aborts,
            "commit_slots_checked": state.replica_check.slots_checked,
            "commit_mismatches": len(state.replica_check.mismatches),
        }
        state.shutdown()
    dist.barrier()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="heal,no-heal")
    parser.add_argument("--steps", type=int, default=72)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    runs = [r for r in args.runs.split(",") if r]
    for name in runs:
        if name not in ("heal", "no-heal"):
            raise SystemExit(f"--runs: unknown run {name!r} (heal, no-heal)")
    # Every run checks after each commit too, and rebalances every interval.
    os.environ["VLLM_ASYNC_EPLB_CHECK_AFTER_REBALANCE"] = "1"
    os.environ["VLLM_ASYNC_EPLB_MIN_GAIN"] = "0"
    with tempfile.TemporaryDirectory(prefix="replica-check-") as tmp:
        workdir = Path(tmp)
        init_parallel(
            make_vllm_config(
                deepseek_spec(), workdir / f"init-r{rank}", world, eplb_config(args)
            ),
            rank,
            world,
        )
        for name in runs:
            result = run(args, name == "heal", workdir)
            if rank == 0:
                print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    print(f"REPLICA CHECK DONE rank {rank}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
