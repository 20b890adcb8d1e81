"""Step overhead: main-thread time EPLB adds to each engine step.

The toy deployment of the EplbState tests (``ToyMoE`` with real weights on CPU
ranks over gloo, skewed routing whose hot experts change every ``--phase``
steps), driven as vLLM's model runner drives it. Per step, the time spent in
``EplbState.step()`` (the slowest rank's, since the engine waits for it), in
steady state and while a rebalance is in flight, for:

- ours, async (``use_async=True``): staging on the worker thread, one layer
  committed per step at an agreed step;
- ours, sync (``use_async=False``): all layers at once inside ``step()``;
- vLLM 0.32's ``EplbState``, sync mode (its async mode needs an accelerator);
  a no-op accelerator stream and event are patched in on CPU.

Same model, routing and load in each run. On CPU the commit copy runs on the
calling thread (no streams), so ours-async in-flight time is also split into
the commit copy and the rest.

    python benchmarks/eplb/bench_step_overhead.py --json out.json

Relaunches itself under torchrun when not started by it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from torchrun_launch import relaunch_under_torchrun  # noqa: E402

from vllm.distributed.async_eplb.config import AsyncEplbConfig  # noqa: E402
from vllm.distributed.async_eplb.eplb_state import (  # noqa: E402
    EpGroupInfo,
    EplbState,
)
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-ranks", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--redundant", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256, help="expert is [H, H] fp32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--interval", type=int, default=20)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--phase", type=int, default=40)
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--json", default="")
    return p.parse_args()


def routing(args: argparse.Namespace, step: int) -> torch.Tensor:
    """Zipf-skewed top-2 ids; the hot set changes every ``--phase`` steps."""
    phase = step // args.phase
    ids = []
    for layer in range(args.layers):
        gen = torch.Generator().manual_seed(1000 * phase + layer)
        order = torch.randperm(args.experts, generator=gen)
        probs = torch.empty(args.experts)
        ranks = torch.arange(1, args.experts + 1, dtype=torch.float)
        probs[order] = 1.0 / ranks**1.5
        gen.manual_seed(step * 31 + layer)
        ids.append(torch.multinomial(probs.expand(args.tokens, -1), 2, generator=gen))
    return torch.stack(ids)


def eplb_config(args: argparse.Namespace, use_async: bool) -> SimpleNamespace:
    return SimpleNamespace(
        window_size=args.window,
        step_interval=args.interval,
        num_redundant_experts=args.redundant,
        log_balancedness=False,
        log_balancedness_interval=1,
        use_async=use_async,
        policy="default",
        communicator="torch_gloo",
    )


class ModelConfigStub:
    model = "toy"

    def compute_hash(self) -> str:
        return "toy-hash"


def _round_state(state: object) -> str:
    """Our ``EplbState``'s round state ("idle" for vLLM's, which has none)."""
    rnd = getattr(state, "_round", None)
    return "idle" if rnd is None else rnd.state.value


def drive(args, state, model, is_ours: bool) -> list[dict]:
    """Run the steps; per step: seconds in step(), in flight?, commit seconds."""
    model_config = ModelConfigStub()
    state.add_model(model, model_config)
    state.step(is_dummy=True, is_profile=True)
    state.start_async_loop()
    records = []
    for step in range(args.steps):
        ids = routing(args, step)
        state.prepare_forward(model_config, args.tokens)
        model.forward(ids)
        dummy = step % 11 == 5
        phase_before = _round_state(state)
        commits_before = len(state.counters.commit_seconds) if is_ours else 0
        start = time.perf_counter()
        state.step(is_dummy=dummy)
        seconds = time.perf_counter() - start
        rearranged = state.expert_rearrangement_step == 0
        in_flight = rearranged or phase_before != "idle"
        if is_ours:
            in_flight = in_flight or _round_state(state) != "idle"
            commit = sum(state.counters.commit_seconds[commits_before:])
        else:
            commit = 0.0
        records.append({"s": seconds, "in_flight": in_flight, "commit_s": commit})
    ids = routing(args, args.steps)
    assert torch.equal(
        model.forward(ids, record_load=False), model.reference_forward(ids)
    ), "wrong experts after the run"
    return records


def worst_over_ranks(records: list[dict]) -> list[dict]:
    """Per step, the slowest rank's time (the engine waits for it)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    out = []
    for per_rank in zip(*gathered, strict=True):
        slowest = max(per_rank, key=lambda r: r["s"])
        out.append(
            {
                "s": slowest["s"],
                "in_flight": any(r["in_flight"] for r in per_rank),
                "commit_s": slowest["commit_s"],
            }
        )
    return out


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    t = torch.tensor(values, dtype=torch.float64) * 1e3
    return {
        "n": len(values),
        "p50_ms": float(t.quantile(0.5)),
        "p99_ms": float(t.quantile(0.99)),
        "max_ms": float(t.max()),
    }


def summarize(records: list[dict]) -> dict:
    steady = [r["s"] for r in records if not r["in_flight"]]
    flight = [r["s"] for r in records if r["in_flight"]]
    rest = [r["s"] - r["commit_s"] for r in records if r["in_flight"]]
    commit = [r["commit_s"] for r in records if r["in_flight"] and r["commit_s"]]
    return {
        "steady": percentiles(steady),
        "in_flight": percentiles(flight),
        "in_flight_minus_commit_copy": percentiles(rest),
        "commit_copy_steps": percentiles(commit),
    }


def new_model(args: argparse.Namespace) -> ToyMoE:
    return ToyMoE(
        args.layers,
        args.experts,
        args.redundant,
        dist.get_world_size(),
        dist.get_rank(),
        hidden_size=args.hidden,
        top_k=2,
        dtype=torch.float32,
    )


def run_ours(args: argparse.Namespace, use_async: bool) -> tuple[dict, dict]:
    parallel_config = SimpleNamespace(
        eplb_config=eplb_config(args, use_async),
        enable_elastic_ep=False,
        num_ubatches=0,
    )
    state = EplbState(
        parallel_config,
        "cpu",
        ep_group=EpGroupInfo.whole_world(),
        config=AsyncEplbConfig.from_env(),
    )
    records = worst_over_ranks(drive(args, state, new_model(args), is_ours=True))
    counters = vars(state.counters).copy()
    state.shutdown()
    extra = {
        k: counters[k]
        for k in ("rebalances", "skips", "aborts", "layers_committed", "bytes_moved")
    }
    extra["per_step_ms"] = [round(r["s"] * 1e3, 3) for r in records]
    return summarize(records), extra


class _NoOpStream:
    def synchronize(self) -> None:
        return None


class _NoOpEvent:
    """Stands in for ``torch.Event`` on CPU: vLLM times its rearrangement."""

    def __init__(self, *args, **kwargs) -> None:
        self.t = 0.0

    def record(self, *args, **kwargs) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end: _NoOpEvent) -> float:
        return (end.t - self.t) * 1e3


def run_vllm(args: argparse.Namespace) -> tuple[dict, dict]:
    from vllm.config import EPLBConfig
    from vllm.distributed.eplb.eplb_state import EplbState as VllmEplbState

    parallel_config = vllm_parallel_config()
    parallel_config.eplb_config = EPLBConfig(
        window_size=args.window,
        step_interval=args.interval,
        num_redundant_experts=args.redundant,
        use_async=False,
        communicator="torch_gloo",
    )
    saved = torch.accelerator.current_stream, torch.Event
    torch.accelerator.current_stream = lambda *a, **k: _NoOpStream()
    torch.Event = _NoOpEvent
    try:
        state = VllmEplbState(parallel_config, torch.device("cpu"))
        records = drive(args, state, new_model(args), is_ours=False)
    finally:
        torch.accelerator.current_stream, torch.Event = saved
    return summarize(worst_over_ranks(records)), {}


_VLLM_PARALLEL_CONFIG = None


def vllm_parallel_config():
    return _VLLM_PARALLEL_CONFIG


def init_vllm_parallel_state(world: int, rank: int) -> None:
    """vLLM's parallel state on gloo, with the EP and EPLB groups its
    EplbState uses (vLLM accepts enable_eplb only on GPUs: set after checks)."""
    global _VLLM_PARALLEL_CONFIG
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )

    parallel_config = ParallelConfig(
        tensor_parallel_size=world, enable_expert_parallel=True
    )
    vllm_config = VllmConfig(parallel_config=parallel_config)
    parallel_config.enable_eplb = True
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world, rank, "env://", int(os.environ["LOCAL_RANK"]), backend="gloo"
        )
        initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
    _VLLM_PARALLEL_CONFIG = parallel_config


def main() -> int:
    args = parse_args()
    if "RANK" not in os.environ:
        return relaunch_under_torchrun(__file__, args.num_ranks)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    if args.skip_vllm:
        dist.init_process_group("gloo")
    else:
        init_vllm_parallel_state(world, rank)
    results: dict = {"args": vars(args)}
    results["ours_async"], results["ours_async_counters"] = run_ours(args, True)
    results["ours_sync"], results["ours_sync_counters"] = run_ours(args, False)
    if not args.skip_vllm:
        results["vllm_sync"], _ = run_vllm(args)
    if rank == 0:
        report(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    dist.barrier()
    os._exit(0)


def report(results: dict) -> None:
    def line(name: str, stats: dict) -> str:
        if not stats.get("n"):
            return f"  {name:<30} (no steps)"
        return (
            f"  {name:<30} n={stats['n']:<4} p50={stats['p50_ms']:8.3f} ms  "
            f"p99={stats['p99_ms']:8.3f} ms  max={stats['max_ms']:8.3f} ms"
        )

    for variant in ("ours_async", "ours_sync", "vllm_sync"):
        if variant not in results:
            continue
        print(variant)
        for key, stats in results[variant].items():
            print(line(key, stats))
    ours = results["ours_async"]
    if "vllm_sync" in results and ours["in_flight"].get("n"):
        stall = results["vllm_sync"]["in_flight"]["max_ms"]
        p99 = ours["in_flight"]["p99_ms"]
        print(
            f"ours async in-flight p99 / vLLM sync stall (max): {p99 / stall:.4f} "
            f"(target <= 0.05)"
        )
    rest, steady = ours["in_flight_minus_commit_copy"], ours["steady"]
    if rest.get("n") and steady.get("n"):
        print(
            f"ours async in-flight minus commit copy, p99 / steady p99: "
            f"{rest['p99_ms'] / steady['p99_ms']:.2f}x (target <= 2x); p50/p50: "
            f"{rest['p50_ms'] / steady['p50_ms']:.2f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
