"""What planning a rebalance on a helper thread costs the engine's main thread.

Both async EPLBs plan off the main thread: vLLM 0.32's async worker runs its
policy on a thread, ours runs placement, predicted gain and transfer plans on
one. A Python thread still holds the GIL while it runs Python, so the main
thread can be held up. Here the main thread runs a short pure-Python work item
over and over (a stand-in for the engine's own Python) while a helper thread
plans one DeepSeek-V3-sized rebalance; we report how much longer the items take
than when nothing runs beside them.

The heap is frozen after start-up, as vLLM's GPU worker does, so the Python
garbage collections that run meanwhile cost what they would in a worker.

Inputs (same for every variant): 58 layers x 256 experts, 8 groups, 32 redundant
slots, 32 ranks in 4 nodes; the old placement is vLLM's default placement of a
lognormal load, the new load that load drifted by 5% (as in bench_policy.py).

    python benchmarks/eplb/bench_planner_gil.py [--repeats 5] [--json PATH]

Needs vLLM installed (its policy is the peer).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

from vllm.distributed.async_eplb.rebalance_algo import warm_up
from vllm.distributed.async_eplb.rebalance_plan import plan_rebalance

LAYERS, EXPERTS, GROUPS, REDUNDANT, RANKS, RANKS_PER_NODE = 58, 256, 8, 32, 32, 8
SLOW_ITEM_S = 1e-3


def work_item() -> int:
    """About 10 us of pure Python, like a slice of the engine's step."""
    total = 0
    for i in range(300):
        total += i * i
    return total


def probe(background: Callable[[], object] | None, idle_s: float) -> dict:
    """Item latencies while ``background`` runs on a thread (or for ``idle_s``)."""
    latencies: list[float] = []
    thread = None
    if background is not None:
        thread = threading.Thread(target=background, name="planner-under-test")
    start = time.perf_counter()
    if thread is not None:
        thread.start()
    while True:
        t0 = time.perf_counter()
        work_item()
        latencies.append(time.perf_counter() - t0)
        if thread is None and t0 - start > idle_s:
            break
        if thread is not None and not thread.is_alive():
            break
    wall = time.perf_counter() - start
    if thread is not None:
        thread.join()
    latencies.sort()
    median = latencies[len(latencies) // 2]
    return {
        "items": len(latencies),
        "wall_s": wall,
        "p50_us": median * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "max_ms": latencies[-1] * 1e3,
        "items_over_1ms": sum(x > SLOW_ITEM_S for x in latencies),
        # main-thread time beyond the items' median: what the helper cost it
        "time_lost_ms": (sum(latencies) - median * len(latencies)) * 1e3,
    }


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(LAYERS, EXPERTS, generator=gen).exp() * 1000
    drift = (torch.randn(LAYERS, EXPERTS, generator=gen) * 0.05).exp()
    nodes = RANKS // RANKS_PER_NODE
    old = DefaultEplbPolicy.rebalance_experts(
        base, EXPERTS + REDUNDANT, GROUPS, nodes, RANKS
    )
    return base * drift, torch.as_tensor(old, dtype=torch.int64)


def variants(load: torch.Tensor, old: torch.Tensor) -> dict[str, Callable]:
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    nodes = RANKS // RANKS_PER_NODE

    def vllm_policy() -> object:
        return DefaultEplbPolicy.rebalance_experts(
            load, EXPERTS + REDUNDANT, GROUPS, nodes, RANKS, old
        )

    def ours(policy: str) -> Callable[[], object]:
        def run() -> object:
            return plan_rebalance(
                old,
                load,
                num_groups=GROUPS,
                num_ranks=RANKS,
                ranks_per_node=RANKS_PER_NODE,
                policy=policy,
            )

        return run

    return {
        "vllm 0.32 policy (placement only)": vllm_policy,
        "ours default (placement + gain + transfer plans)": ours("default"),
        "ours min_migration (placement + gain + transfer plans)": ours("min_migration"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    warm_up("default")
    warm_up("min_migration")
    load, old = inputs()
    runs = variants(load, old)
    for run in runs.values():
        run()  # first-call costs (imports, caches) outside the measurement
    # vLLM's GPU worker freezes the heap after start-up (``freeze_gc_heap``), so
    # a full collection during serving scans only what serving allocated.
    gc.collect()
    gc.freeze()
    results: dict[str, list[dict]] = {"idle": []}
    results.update({name: [] for name in runs})
    for _ in range(args.repeats):  # round-robin, so drift hits every variant
        results["idle"].append(probe(None, idle_s=0.5))
        for name, run in runs.items():
            results[name].append(probe(run, idle_s=0.0))
    print(
        f"main-thread work items (~10 us of Python) while one rebalance is planned "
        f"on a helper thread; median over {args.repeats} runs"
    )
    header = (
        f"{'beside the main thread':58s} {'plan wall ms':>12s} {'item p99 us':>11s} "
        f"{'item max ms':>11s} {'items >1ms':>10s} {'main lost ms':>12s}"
    )
    print(header)
    summary = {}
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        summary[name] = {"median": med, "runs": rows}
        wall = "" if name == "idle" else f"{med['wall_s'] * 1e3:12.1f}"
        print(
            f"{name:58s} {wall:>12s} {med['p99_us']:11.1f} {med['max_ms']:11.2f} "
            f"{med['items_over_1ms']:10.0f} {med['time_lost_ms']:12.1f}"
        )
    if args.json:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "switch_interval_s": sys.getswitchinterval(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
