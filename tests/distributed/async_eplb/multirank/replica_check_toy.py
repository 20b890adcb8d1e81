"""Run under torchrun: replicas left stale on purpose are found and healed.

A ``ToyMoE`` (16 experts + 2 redundant slots, 2 layers) whose redundant
slots are overwritten before ``add_model``, as a loader that skips them
would leave them: layer 0's slot 16 holds zeros, layer 1's slots 16 and 17
hold expert 5's weights. Scenarios, each on a fresh ``EplbState``:

- ``heal``: the start-up check names exactly those slots, heals them with
  the transport, and every output is bit-exact at every step across several
  rebalances; the commit check finds nothing;
- ``no-heal`` (``heal_replicas=False``): same warning, nothing moved, and
  outputs routed to the stale slots are wrong (the check is not vacuous);
- ``healthy``: a correct model: nothing found, no transfer, weights
  untouched;
- ``broken-commit``: commits switch the maps but copy no weights (the
  worker's copy is disabled): the commit check must report mismatches.

Writes ``rank<r>.json`` per rank into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from toy_routing import zipf_routing

import vllm.distributed.async_eplb.worker as worker_module
from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.consistency import weights_digests
from vllm.distributed.async_eplb.eplb_state import EpGroupInfo, EplbState
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE
from vllm.distributed.async_eplb.transports.p2p import P2PTransport

EXPERTS, REDUNDANT, LAYERS, TOKENS, TOP_K = 16, 2, 2, 64, 2
STALE = {0: [16], 1: [16, 17]}  # layer -> global slots overwritten
SCENARIOS = ("heal", "no-heal", "healthy", "broken-commit")


def make_stale(model: ToyMoE, rank: int) -> None:
    """Overwrite the STALE slots this rank holds, before add_model."""
    slots = model.num_local_physical_experts
    for layer, stale in STALE.items():
        weights = model.moe_layers[layer].get_expert_weights()
        for slot in stale:
            if slot // slots != rank:
                continue
            local = slot % slots
            if layer == 0:
                for tensor in weights:
                    tensor[local].zero_()
            else:
                for tensor, value in zip(
                    weights, model.expert_tensors(layer, 5), strict=True
                ):
                    tensor[local].copy_(value)


class StageCounter:
    """Counts ``stage_layer`` calls of every p2p-based transport."""

    def __init__(self) -> None:
        self.calls = 0
        self._original = P2PTransport.stage_layer

    def __enter__(self) -> StageCounter:
        original = self._original

        def counted(transport: Any, *args: Any, **kwargs: Any) -> int:
            self.calls += 1
            return original(transport, *args, **kwargs)

        P2PTransport.stage_layer = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        P2PTransport.stage_layer = self._original  # type: ignore[method-assign]


def run(scenario: str, steps: int, rank: int, world: int) -> dict:
    eplb_config = SimpleNamespace(
        window_size=6,
        step_interval=12,
        num_redundant_experts=REDUNDANT,
        log_balancedness=False,
        log_balancedness_interval=1,
        use_async=True,
    )
    parallel_config = SimpleNamespace(
        eplb_config=eplb_config, enable_elastic_ep=False, num_ubatches=0
    )
    config = AsyncEplbConfig(
        min_gain=0.0,
        vote_delay=2,
        timeout_s=30.0,
        heal_replicas=scenario != "no-heal",
        check_after_rebalance=True,
    )
    state = EplbState(
        parallel_config, "cpu", ep_group=EpGroupInfo.whole_world(), config=config
    )
    model = ToyMoE(
        LAYERS, EXPERTS, REDUNDANT, world, rank, top_k=TOP_K, dtype=torch.bfloat16
    )
    if scenario != "healthy":
        make_stale(model, rank)
    before = weights_digests([layer.get_expert_weights() for layer in model.moe_layers])
    model_config = SimpleNamespace(model="toy", compute_hash=lambda: "toy-hash")
    with StageCounter() as counter:
        state.add_model(model, model_config)
    report = state.replica_check.reports["toy"]
    after = weights_digests(model.expert_weights)
    changed = (before != after).nonzero().tolist()

    original_copy = worker_module.copy_rows
    if scenario == "broken-commit":
        worker_module.copy_rows = lambda *args, **kwargs: None
    state.step(is_dummy=True, is_profile=True)
    state.start_async_loop()
    mismatches = 0
    for step in range(steps):
        ids = zipf_routing(step, 30, LAYERS, EXPERTS, TOKENS, TOP_K)
        state.prepare_forward(model_config, TOKENS)
        if not torch.equal(model.forward(ids), model.reference_forward(ids)):
            mismatches += 1
        state.step()
    worker_module.copy_rows = original_copy
    # What every slot holds at the end, against the committed maps.
    slots = model.num_local_physical_experts
    phy2log = state.model_states["toy-hash"].maps.phy2log
    workspace_ok = all(
        model.slot_experts(layer)
        == phy2log[layer, rank * slots : (rank + 1) * slots].tolist()
        for layer in range(LAYERS)
    )
    check = state.replica_check
    result = {
        "scenario": scenario,
        "stale": [(s.layer, s.slot, s.expert, s.primary) for s in report.stale],
        "healed": report.healed,
        "bytes_received": report.bytes_received,
        "stage_calls_in_add_model": counter.calls,
        "changed_local_slots": changed,
        "mismatched_steps": mismatches,
        "workspace_ok": workspace_ok,
        "rebalances": state.counters.rebalances,
        "layers_committed": state.counters.layers_committed,
        "aborts": state.counters.aborts,
        "commit_slots_checked": check.slots_checked,
        "commit_mismatches": [(m.layer, m.slot, m.expert) for m in check.mismatches],
    }
    state.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out-dir", required=True, help="writes rank<r>.json there")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.WARNING, format=f"[rank{rank}] %(message)s")
    results = {}
    for scenario in args.scenarios.split(","):
        if scenario not in SCENARIOS:
            raise SystemExit(f"--scenarios: unknown scenario {scenario!r}")
        results[scenario] = run(scenario, args.steps, rank, world)
        dist.barrier()
    print("RESULT", json.dumps(results), flush=True)
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
