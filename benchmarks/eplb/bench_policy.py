"""Placement policies side by side: vLLM's and ours, with the balance bound.

For every configuration, every policy gets the same inputs in one run: a new
load and the old placement (vLLM's default placement of the previous load).
Printed per configuration: the time of each policy, the runs of all policies
interleaved in a rotating order, and vLLM's time over it; by default CPU time
of this process (``time.process_time``, torch on one thread: on a shared
machine, wall time mostly measures the other tenants), the minimum of the
runs (``--clock wall``: median wall time); balancedness as vLLM logs it
(mean tokens per rank summed over layers over the busiest rank's tokens summed
over layers) of each on the new load, of the stale old placement, and the
bound no placement can beat (``quality.balancedness_bound``), with the share
of vLLM's gap to the bound each policy closes; experts new to each rank per
layer and the bytes that moves.

Policies: vLLM 0.32's ``DefaultEplbPolicy``, ours ``default`` (identical
output), ``balanced``, ``balanced_spill`` and ``min_migration``.

Loads:
- "lognormal": DeepSeek-V3 geometry (58 layers x 256 experts, 8 groups), expert
  load lognormal (sigma 1), drifted by a 5% lognormal factor (sigma 0.05);
  experts of 44 MB (FP8 DeepSeek-V3).
- "esft-task": the real routing of DeepSeek-V2-Lite (26 layers x 64 experts,
  ``vllm/distributed/async_eplb/data/``), one task's whole load (intent or
  translation); the old load is that task's first half.
- "esft-trace": the same trace as a time series: the load of one rebalance is
  a block of 16 windows (2048 tokens); the drift is the move to the next
  block, across the four tasks in order (15 transitions, 3 of them a change
  of task); figures are averaged over the transitions. Experts of 17.3 MB
  (DeepSeek-V2-Lite, BF16: 3 x 2048 x 1408 x 2 bytes).

``--locality`` adds the hierarchical trade-off: DeepSeek-V2-Lite with its 64
experts in 8 groups of 8 on 4 nodes, per policy the balancedness of each task's
load and the mean number of distinct nodes a token's 6 experts are served from,
computed from the ESFT per-token routing (``esft_routing``).

Needs vLLM installed (its policy is the peer). Usage:
    python benchmarks/eplb/bench_policy.py [--quick] [--locality]
        [--clock cpu|wall] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import vllm.distributed.async_eplb as async_eplb
from vllm.distributed.async_eplb.rebalance_algo import rebalance_experts, warm_up
from vllm.distributed.async_eplb.rebalance_algo.quality import (
    balancedness_bound,
    logged_balancedness,
    mean_nodes_touched,
    new_experts_per_rank,
)

DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048  # FP8, one byte per weight
DEEPSEEK_V2_LITE_EXPERT_BYTES = 3 * 2048 * 1408 * 2  # BF16
TRACE = Path(async_eplb.__file__).resolve().parent / "data" / "loads_w128.npz"
TRACE_TASKS = ("intent", "law", "summary", "translation")
TABLE_TASKS = ("intent", "translation")
TRACE_BLOCK_WINDOWS = 16
DRIFT_SIGMA = 0.05
OURS = ("default", "balanced", "balanced_spill", "min_migration")
POLICIES = ("vllm", *OURS)
Transition = tuple[torch.Tensor, torch.Tensor]  # (old load, new load), [L, E]


@dataclass(frozen=True)
class Geometry:
    replicas: int
    groups: int
    nodes: int
    ranks: int


@dataclass(frozen=True)
class Config:
    name: str
    load: str
    geometry: Geometry
    expert_bytes: int
    transitions: tuple[Transition, ...]


def lognormal_transitions(layers: int, seed: int) -> tuple[Transition, ...]:
    rng = np.random.default_rng(seed)
    load = rng.lognormal(0.0, 1.0, (layers, 256)) * 100
    drifted = load * rng.lognormal(0.0, DRIFT_SIGMA, load.shape)
    return ((torch.from_numpy(load).float(), torch.from_numpy(drifted).float()),)


def _trace_windows() -> dict[str, np.ndarray]:
    with np.load(TRACE) as archive:
        return {task: archive[task] for task in TRACE_TASKS}


def task_transition(task: str) -> tuple[Transition, ...]:
    """The task's first half as the old load, the whole task as the new."""
    windows = _trace_windows()[task]
    half = windows[: len(windows) // 2].sum(axis=0)
    return ((torch.from_numpy(half).float(), torch.from_numpy(windows.sum(0)).float()),)


def trace_transitions(max_transitions: int) -> tuple[Transition, ...]:
    windows = np.concatenate(list(_trace_windows().values()))
    blocks = [
        torch.from_numpy(windows[i : i + TRACE_BLOCK_WINDOWS].sum(axis=0)).float()
        for i in range(0, len(windows) - TRACE_BLOCK_WINDOWS + 1, TRACE_BLOCK_WINDOWS)
    ]
    pairs = tuple(itertools.pairwise(blocks))
    return pairs[:max_transitions]


def configs(quick: bool, seed: int) -> list[Config]:
    synthetic = lognormal_transitions(4 if quick else 58, seed)
    trace = trace_transitions(2 if quick else 10**6)
    v3 = [
        ("EP32 hier (4 nodes)", Geometry(288, 8, 4, 32)),
        ("EP32 global", Geometry(288, 8, 1, 32)),
        ("EP64 global", Geometry(320, 8, 1, 64)),
        ("EP144 global", Geometry(288, 8, 1, 144)),
    ]
    v2_lite = [
        ("EP16 x5", Geometry(80, 1, 1, 16)),
        ("EP32 x3", Geometry(96, 1, 1, 32)),
        ("EP40 x2", Geometry(80, 1, 1, 40)),
    ]
    out = [
        Config(name, "lognormal", geo, DEEPSEEK_V3_EXPERT_BYTES, synthetic)
        for name, geo in v3
    ]
    for task in TABLE_TASKS[:1] if quick else TABLE_TASKS:
        out += [
            Config(
                f"{name} {task}",
                "esft-task",
                geo,
                DEEPSEEK_V2_LITE_EXPERT_BYTES,
                task_transition(task),
            )
            for name, geo in v2_lite
        ]
    out += [
        Config(name, "esft-trace", geo, DEEPSEEK_V2_LITE_EXPERT_BYTES, trace)
        for name, geo in (("EP8 x10", Geometry(80, 1, 1, 8)), v2_lite[0])
    ]
    return [out[1], out[4], out[-1]] if quick else out


def policy_functions(geo: Geometry) -> dict[str, Callable]:
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    args = (geo.replicas, geo.groups, geo.nodes, geo.ranks)

    def vllm(load: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        return DefaultEplbPolicy.rebalance_experts(load, *args, old)

    def ours(policy: str) -> Callable:
        def run(load: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
            return rebalance_experts(load, *args, old, policy=policy)

        return run

    return {"vllm": vllm, **{name: ours(name) for name in OURS}}


CLOCKS = {
    "cpu": (time.process_time, min),
    "wall": (time.perf_counter, statistics.median),
}


def run_config(config: Config, repeats: int, clock: str = "cpu") -> dict:
    geo = config.geometry
    functions = policy_functions(geo)
    now, summary = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in POLICIES}
    balance: dict[str, list[float]] = {name: [] for name in (*POLICIES, "stale")}
    bound: list[float] = []
    moved: dict[str, list[float]] = {name: [] for name in POLICIES}
    for old_load, new_load in config.transitions:
        old = functions["vllm"](old_load, None)
        for fn in functions.values():  # warm-up: numba compile / load from cache
            fn(new_load, old)
        placements = {}
        for repeat in range(repeats):
            # Rotate the order so no policy always runs right after another.
            shift = repeat % len(POLICIES)
            for name in POLICIES[shift:] + POLICIES[:shift]:
                start = now()
                placements[name] = functions[name](new_load, old).numpy()
                times[name].append(now() - start)
        new_np, old_np = new_load.numpy(), old.numpy()
        balance["stale"].append(logged_balancedness(new_np, old_np, geo.ranks))
        bound.append(balancedness_bound(new_np, geo.replicas, geo.ranks))
        for name, placement in placements.items():
            balance[name].append(logged_balancedness(new_np, placement, geo.ranks))
            moved[name].append(
                float(new_experts_per_rank(old_np, placement, geo.ranks).mean())
            )
    num_layers = config.transitions[0][0].shape[0]
    time_ms = {name: 1e3 * summary(t) for name, t in times.items()}
    balance_mean = {name: statistics.fmean(b) for name, b in balance.items()}
    bound_mean = statistics.fmean(bound)
    moved_per_rank = {name: statistics.fmean(m) for name, m in moved.items()}
    vllm_gap = bound_mean - balance_mean["vllm"]
    return {
        "name": config.name,
        "load": config.load,
        "geometry": {
            "layers": num_layers,
            "experts": int(config.transitions[0][0].shape[1]),
            "replicas": geo.replicas,
            "groups": geo.groups,
            "nodes": geo.nodes,
            "ranks": geo.ranks,
            "slots_per_rank": geo.replicas // geo.ranks,
        },
        "transitions": len(config.transitions),
        "expert_bytes": config.expert_bytes,
        "clock": clock,
        "time_ms": time_ms,
        "speedup_vs_vllm": {name: time_ms["vllm"] / time_ms[name] for name in OURS},
        "balancedness": balance_mean,
        "bound": bound_mean,
        "gap_closed": {
            name: (balance_mean[name] - balance_mean["vllm"]) / vllm_gap
            if vllm_gap > 1e-9
            else None
            for name in OURS
        },
        "drift": {
            name: {
                "new_experts_per_rank": moved_per_rank[name],
                "bytes_moved": moved_per_rank[name]
                * geo.ranks
                * num_layers
                * config.expert_bytes,
                "balancedness": balance_mean[name],
            }
            for name in POLICIES
        },
        "min_migration_vs_vllm": {
            "moved_ratio": moved_per_rank["min_migration"]
            / max(moved_per_rank["vllm"], 1e-12),
            "balancedness_gap": balance_mean["vllm"] - balance_mean["min_migration"],
        },
    }


def _closed(value: float | None) -> str:
    return "   -" if value is None else f"{value:4.2f}"


def print_table(results: list[dict], clock: str) -> None:
    short = {"default": "def", "balanced": "bal", "balanced_spill": "spill"}
    short["min_migration"] = "mm"
    print(f"{clock} time ms (vLLM / ours = speed-up) | balancedness as vLLM logs it,")
    print("share of vLLM's gap to the bound closed | new experts per rank per layer")
    print(
        f"{'config':<22} {'load':<10} | {'vLLM':>6}"
        + "".join(f" {short[n]:>5}" for n in OURS)
        + " | "
        + " ".join(f"{'x ' + short[n]:>6}" for n in OURS)
        + f" | {'stale':>6} {'vLLM':>6}"
        + "".join(f" {short[n]:>6}" for n in OURS)
        + f" {'bound':>6} | {'cl bal':>6} {'cl sp':>5} {'cl mm':>5}"
        + f" | {'vLLM':>6} {'mm':>6} {'mm/vLLM':>7}"
    )
    for r in results:
        t, b, d = r["time_ms"], r["balancedness"], r["drift"]
        print(
            f"{r['name']:<22} {r['load']:<10} | {t['vllm']:6.1f}"
            + "".join(f" {t[n]:5.1f}" for n in OURS)
            + " | "
            + " ".join(f"{r['speedup_vs_vllm'][n]:6.1f}" for n in OURS)
            + f" | {b['stale']:6.4f} {b['vllm']:6.4f}"
            + "".join(f" {b[n]:6.4f}" for n in OURS)
            + f" {r['bound']:6.4f} | {_closed(r['gap_closed']['balanced']):>6}"
            + f" {_closed(r['gap_closed']['balanced_spill']):>5}"
            + f" {_closed(r['gap_closed']['min_migration']):>5}"
            + f" | {d['vllm']['new_experts_per_rank']:6.3f}"
            + f" {d['min_migration']['new_experts_per_rank']:6.3f}"
            + f" {r['min_migration_vs_vllm']['moved_ratio']:7.3f}"
        )
        if d["default"]["new_experts_per_rank"] != d["vllm"]["new_experts_per_rank"]:
            print(f"  WARNING: ours 'default' differs from vLLM's on {r['name']}")


def _locality_runs(
    load: torch.Tensor, replicas: int, groups: int, nodes: int, ranks: int
) -> dict[str, np.ndarray]:
    """Placements of one load by vLLM's and our policies, hierarchical and
    global (one node for the placement; the metric still counts 4 nodes)."""
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    out = {
        f"vLLM {mode}": DefaultEplbPolicy.rebalance_experts(
            load, replicas, groups, placed_on, ranks
        )
        for mode, placed_on in (("hierarchical", nodes), ("global", 1))
    }
    for policy in ("balanced", "balanced_spill"):
        out[f"{policy} hierarchical"] = rebalance_experts(
            load, replicas, groups, nodes, ranks, policy=policy
        )
    out["balanced global"] = rebalance_experts(
        load, replicas, groups, 1, ranks, policy="balanced"
    )
    return {name: placement.numpy() for name, placement in out.items()}


def locality(quick: bool) -> list[dict]:
    """Balancedness and mean distinct nodes per token, per policy, on the
    ESFT tasks' loads and per-token routing (DeepSeek-V2-Lite, 8 groups of 8
    experts, 4 nodes)."""
    from esft_routing import load_topk

    tasks = TABLE_TASKS[:1] if quick else TABLE_TASKS
    routing = load_topk(tasks)
    windows = _trace_windows()
    groups, nodes = 8, 4
    rows = []
    for task in tasks:
        load = torch.from_numpy(windows[task].sum(axis=0)).float()
        for replicas, ranks in ((96, 32), (80, 16)):
            runs = _locality_runs(load, replicas, groups, nodes, ranks)
            for name, placement in runs.items():
                touched = [
                    mean_nodes_touched(ids, placement[layer], ranks, nodes)
                    for layer, ids in enumerate(routing[task])
                ]
                rows.append(
                    {
                        "task": task,
                        "replicas": replicas,
                        "ranks": ranks,
                        "nodes": nodes,
                        "groups": groups,
                        "policy": name,
                        "balancedness": logged_balancedness(load, placement, ranks),
                        "nodes_per_token": statistics.fmean(touched),
                    }
                )
    return rows


def print_locality(rows: list[dict]) -> None:
    print(
        "\nHierarchical trade-off: DeepSeek-V2-Lite (ESFT), 64 experts in 8 groups,"
        " 4 nodes; nodes a token's 6 experts touch (uniform replica choice)"
    )
    print(f"{'task':<12} {'geometry':<10} {'policy':<28} {'balance':>7} {'nodes':>6}")
    for r in rows:
        geometry = f"EP{r['ranks']} x{r['replicas'] // r['ranks']}"
        print(
            f"{r['task']:<12} {geometry:<10} {r['policy']:<28}"
            f" {r['balancedness']:7.4f} {r['nodes_per_token']:6.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--locality", action="store_true", help="nodes per token")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lognormal")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: process CPU time, torch on one thread, minimum of the runs;"
        " wall: median wall time",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 7)
    if args.clock == "cpu":
        torch.set_num_threads(1)
    for policy in OURS:
        warm_up(policy)
    load_before = os.getloadavg()
    results = [
        run_config(c, repeats, args.clock) for c in configs(args.quick, args.seed)
    ]
    load_after = os.getloadavg()
    print_table(results, args.clock)
    rows = locality(args.quick) if args.locality else []
    if rows:
        print_locality(rows)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "repeats": repeats,
        "clock": args.clock,
        "configs": results,
        "locality": rows,
    }
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f};"
        f" {repeats} timed runs per policy and transition"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
