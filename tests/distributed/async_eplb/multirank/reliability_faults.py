"""torchrun script: faults injected into EplbState driving the toy MoE (gloo, CPU).

Each scenario runs on a fresh ``EplbState`` and ``ToyMoE``, in one process
group, in the order given; ``shutdown`` must come last (it ends the process).
At every step, on every rank, the output must equal the unmoved reference bit
for bit (an assertion here fails the run). Faults are injected through the
test-only hook (``fault_hook.install_fault_hook``) on one rank:

- ``raise``: staging a layer raises on rank 1, in the middle of a job;
- ``slow``: staging a layer sleeps past the timeout on rank 2;
- ``die``: the staging thread of rank 3 dies (a ``BaseException``);
- ``vote_stall``: rank 1's copy of one ready vote never completes (so its
  peers' copies lack rank 1 and never complete either): every rank times
  out once and turns balancing off;
- ``plan_stall``: rank 2's planner takes longer than the timeout: the round
  fails there, the vote aborts it everywhere, the next interval rebalances;
- ``soak``: ``--soak-rebalances`` rebalances under drifting load, the
  workspace checked against the maps after each, RSS sampled after each;
- ``shutdown``: every rank shuts EplbState down in the middle of a rebalance,
  then checks threads, staging memory and process groups, and exits normally.

Writes ``<out-dir>/<scenario>-rank<r>.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import threading
import time
import weakref
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from fault_hook import install_fault_hook
from toy_routing import zipf_routing

from vllm.distributed.async_eplb import plan_thread
from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.eplb_state import EpGroupInfo, EplbState
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE

LAYERS, EXPERTS, REDUNDANT, TOKENS, TOP_K = 3, 16, 4, 48, 2
TIMEOUT_S = 1.0  # the fault scenarios wait it out: short keeps the test short
# The soak injects nothing: a scheduling hiccup of a loaded machine must not
# pass for a stall there.
SOAK_TIMEOUT_S = 10.0
MODEL_CONFIG = SimpleNamespace(model="toy", compute_hash=lambda: "toy-hash")


class WorkerKilled(BaseException):
    """Not an ``Exception``: escapes the per-layer handler and ends the thread."""


class ErrorRecords(logging.Handler):
    """Keeps the text (message and traceback) of every ERROR record."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.format(record))


def routing(step: int, phase_len: int) -> torch.Tensor:
    return zipf_routing(step, phase_len, LAYERS, EXPERTS, TOKENS, TOP_K)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_state(
    interval: int, window: int, layers_per_step: int, timeout_s: float = TIMEOUT_S
) -> tuple[EplbState, ToyMoE]:
    rank, world = dist.get_rank(), dist.get_world_size()
    eplb_config = SimpleNamespace(
        window_size=window,
        step_interval=interval,
        num_redundant_experts=REDUNDANT,
        log_balancedness=False,
        log_balancedness_interval=1,
        use_async=True,
    )
    parallel_config = SimpleNamespace(
        eplb_config=eplb_config, enable_elastic_ep=False, num_ubatches=0
    )
    model = ToyMoE(
        LAYERS,
        EXPERTS,
        REDUNDANT,
        world,
        rank,
        hidden_size=8,
        top_k=TOP_K,
        dtype=torch.bfloat16,
    )
    config = AsyncEplbConfig(
        min_gain=0.0,
        vote_delay=1,
        timeout_s=timeout_s,
        layers_per_step=layers_per_step,
    )
    state = EplbState(
        parallel_config, "cpu", ep_group=EpGroupInfo.whole_world(2), config=config
    )
    state.add_model(model, MODEL_CONFIG)
    state.step(is_dummy=True, is_profile=True)
    state.start_async_loop()
    return state, model


def workspace_matches_maps(state: EplbState, model: ToyMoE) -> bool:
    maps = state.model_states["toy-hash"].maps
    slots = model.num_local_physical_experts
    first = model.rank * slots
    return all(
        model.slot_experts(layer) == maps.phy2log[layer, first : first + slots].tolist()
        for layer in range(LAYERS)
    )


def one_step(state: EplbState, model: ToyMoE, step: int, phase_len: int) -> float:
    """Forward (checked against the reference), then ``state.step``; its seconds."""
    ids = routing(step, phase_len)
    state.prepare_forward(MODEL_CONFIG, TOKENS)
    out = model.forward(ids)
    assert torch.equal(out, model.reference_forward(ids)), (
        f"rank {model.rank} step {step}: output differs from the reference"
    )
    start = time.perf_counter()
    state.step()
    return time.perf_counter() - start


def drive(
    state: EplbState,
    model: ToyMoE,
    steps: int,
    phase_len: int,
    until: Any = None,
) -> dict:
    """Run steps; log every abort, commit and turn-off with step and epoch.

    ``until(state, events)`` ends the run early; it must be the same on all
    ranks (events are: the counters change at agreed steps).
    """
    c = state.counters
    events: list[tuple[int, str, int]] = []
    step_seconds: list[float] = []
    for step in range(steps):
        before = (c.aborts, c.rebalances, c.balancing_enabled, c.skips)
        epoch = state._round.epoch  # a step may end one rebalance and start the next
        step_seconds.append(one_step(state, model, step, phase_len))
        if c.aborts != before[0]:
            events.append((step, "abort", epoch))
        if c.rebalances != before[1]:
            assert workspace_matches_maps(state, model), f"step {step}: workspace"
            events.append((step, "rebalance", epoch))
        if c.skips != before[3]:
            events.append((step, "skip", epoch))
        if c.balancing_enabled != before[2]:
            events.append((step, "off", epoch))
        if until is not None and until(state, events):
            break
    assert workspace_matches_maps(state, model), "final workspace"
    return {"events": events, "max_step_s": max(step_seconds), "steps": step + 1}


def agree(value: Any) -> None:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    assert all(g == gathered[0] for g in gathered), f"ranks disagree: {gathered}"


def fire_once(kind: str, on_rank: int, at_call: int = 2) -> None:
    """Install a hook that injects ``kind`` at the ``at_call``-th staged layer."""
    if dist.get_rank() != on_rank:
        install_fault_hook(None)
        return
    calls = {"n": 0}

    def hook() -> None:
        calls["n"] += 1
        if calls["n"] != at_call:
            return
        if kind == "raise":
            raise RuntimeError(f"injected staging failure (staged layer {at_call})")
        if kind == "slow":
            time.sleep(2.5 * TIMEOUT_S)
        if kind == "die":
            raise WorkerKilled(f"injected thread death (staged layer {at_call})")

    install_fault_hook(hook)


class NeverDone:
    """A collective work that never completes (a stalled vote)."""

    def is_completed(self) -> bool:
        return False

    def wait(self) -> bool:
        raise RuntimeError("a stalled vote was waited for")


def stall_one_vote(state: EplbState, on_rank: int, at_launch: int = 3) -> None:
    """On ``on_rank``, the ``at_launch``-th ready vote skips its all-reduce."""
    vote = state._parts.vote
    if dist.get_rank() != on_rank or vote is None or vote._allreduce is None:
        return
    real, launches = vote._allreduce, {"n": 0}

    def allreduce(tensors: list) -> Any:
        launches["n"] += 1
        return NeverDone() if launches["n"] == at_launch else real(tensors)

    vote._allreduce = allreduce


def stall_planner_once(on_rank: int) -> None:
    """On ``on_rank``, the next plan takes 2.5 timeouts."""
    if dist.get_rank() != on_rank:
        return
    real = plan_thread.compute_plans
    calls = {"n": 0}

    def slow(request: Any, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(2.5 * TIMEOUT_S)
        return real(request, *args)

    plan_thread.compute_plans = slow


def stall_scenario(kind: str, steps: int, errors: ErrorRecords) -> dict:
    state, model = make_state(interval=8, window=4, layers_per_step=1)
    errors.texts.clear()
    real_plans = plan_thread.compute_plans
    if kind == "vote_stall":
        stall_one_vote(state, on_rank=1)
    else:
        stall_planner_once(on_rank=2)
    result = drive(state, model, steps, phase_len=8, until=recovered)
    plan_thread.compute_plans = real_plans
    agree(result["events"])
    agree(state.model_states["toy-hash"].maps.phy2log.tolist())
    result.update(outcome(state, errors))
    state.shutdown()
    return result


def outcome(state: EplbState, errors: ErrorRecords) -> dict:
    """What a fault or stall scenario ended with: counters and logged errors."""
    c = state.counters
    return dict(
        aborts=c.aborts,
        rebalances=c.rebalances,
        abort_cause=c.last_abort_cause,
        balancing_enabled=c.balancing_enabled,
        disabled_cause=c.disabled_cause,
        worker_deaths=c.worker_deaths,
        errors=list(errors.texts),
        timeout_s=TIMEOUT_S,
    )


def recovered(state: EplbState, events: list) -> bool:
    """Stop once a rebalance committed after an abort or a turn-off + 2 intervals."""
    kinds = [kind for _, kind, _ in events]
    if "abort" in kinds and "rebalance" in kinds[kinds.index("abort") :]:
        return True
    if "off" in kinds:
        off_step = events[kinds.index("off")][0]
        return state.step_count > off_step + 2 * 8 + 2
    return False


def fault_scenario(kind: str, on_rank: int, steps: int, errors: ErrorRecords) -> dict:
    state, model = make_state(interval=8, window=4, layers_per_step=1)
    errors.texts.clear()
    fire_once(kind, on_rank)
    result = drive(state, model, steps, phase_len=8, until=recovered)
    install_fault_hook(None)
    agree(result["events"])
    result.update(outcome(state, errors))
    start = time.perf_counter()
    state.shutdown()
    result["shutdown_s"] = time.perf_counter() - start
    return result


def soak_scenario(rebalances: int) -> dict:
    state, model = make_state(
        interval=4, window=4, layers_per_step=LAYERS, timeout_s=SOAK_TIMEOUT_S
    )
    c = state.counters
    samples: list[int] = []
    step = 0
    start = time.perf_counter()
    moved_rebalances = 0
    while c.rebalances < rebalances:
        before, committed = c.rebalances, c.layers_committed
        one_step(state, model, step, phase_len=5)
        step += 1
        if c.rebalances != before:
            assert workspace_matches_maps(state, model), f"step {step}: workspace"
            moved_rebalances += c.layers_committed != committed
            samples.append(rss_bytes())
        assert c.aborts == 0, c.last_abort_cause
        assert step < 40 * rebalances, "rebalances stopped happening"
    seconds = time.perf_counter() - start
    gc.collect()
    samples.append(rss_bytes())
    agree(
        (
            c.rebalances,
            c.layers_committed,
            state.model_states["toy-hash"].maps.phy2log.tolist(),
        )
    )
    warm = samples[min(len(samples) - 1, max(10, len(samples) // 5))]
    result = {
        "rebalances": c.rebalances,
        "rebalances_moving_weights": moved_rebalances,
        "layers_committed": c.layers_committed,
        "aborts": c.aborts,
        "steps": step,
        "seconds": seconds,
        "rss_after_warmup": warm,
        "rss_end": samples[-1],
        "rss_max_after_warmup": max(samples[samples.index(warm) :]),
    }
    state.shutdown()
    return result


def shutdown_scenario() -> dict:
    groups_before = len(dist.distributed_c10d._world.pg_map)
    state, model = make_state(interval=8, window=4, layers_per_step=1)
    ms = state.model_states["toy-hash"]
    buffer_ref = weakref.ref(ms.buffer._packed)

    def mid_rebalance(s: EplbState, events: Any = None) -> bool:
        pending = s._round.pending_layers(0)
        return bool(pending) and len(pending) < len(s._round.plans[0].changed_layers)

    result = drive(state, model, 200, phase_len=8, until=mid_rebalance)
    assert mid_rebalance(state), "no step in the middle of a rebalance"
    start = time.perf_counter()
    state.shutdown()
    result["shutdown_s"] = time.perf_counter() - start
    gc.collect()
    result.update(
        threads=sorted(t.name for t in threading.enumerate()),
        staging_buffer_freed=buffer_ref() is None,
        groups_left=len(dist.distributed_c10d._world.pg_map) - groups_before,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--scenarios",
        default="raise,slow,die,vote_stall,plan_stall,soak,shutdown",
    )
    parser.add_argument("--soak-rebalances", type=int, default=200)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.WARNING, format=f"[rank{rank}] %(message)s")
    errors = ErrorRecords()
    logging.getLogger("vllm.distributed.async_eplb").addHandler(errors)
    torch.manual_seed(0)
    scenarios = args.scenarios.split(",")
    assert "shutdown" not in scenarios[:-1], "shutdown must be the last scenario"
    for name in scenarios:
        start = time.perf_counter()
        if name == "raise":
            result = fault_scenario("raise", 1, 200, errors)
        elif name == "slow":
            result = fault_scenario("slow", 2, 1000, errors)
        elif name == "die":
            result = fault_scenario("die", 3, 200, errors)
        elif name in ("vote_stall", "plan_stall"):
            result = stall_scenario(name, 200, errors)
        elif name == "soak":
            result = soak_scenario(args.soak_rebalances)
        elif name == "shutdown":
            result = shutdown_scenario()
        else:
            raise ValueError(f"unknown scenario {name!r}")
        result["wall_s"] = time.perf_counter() - start
        print(f"RESULT {name} rank{rank}", json.dumps(result)[:400], flush=True)
        with open(os.path.join(args.out_dir, f"{name}-rank{rank}.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    assert not dist.is_initialized()


if __name__ == "__main__":
    main()
