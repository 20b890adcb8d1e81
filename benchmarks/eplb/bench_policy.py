"""Placement policies side by side: vLLM's default and ours (default, min_migration).

For every configuration, all three policies get the same inputs in one run: a
new load and the old placement (vLLM's default placement of the previous load).
Printed per configuration: median wall time of each policy and the ratios;
balancedness (mean / max tokens per rank, averaged over layers) of each on the
new load, and of the stale old placement; the experts new to each rank per
layer and the bytes that moves.

Loads:
- "lognormal": DeepSeek-V3 geometry (58 layers x 256 experts, 8 groups), expert
  load lognormal (sigma 1), drifted by a 5% lognormal factor (sigma 0.05);
  experts of 44 MB (FP8 DeepSeek-V3).
- "esft-trace": the shipped real routing trace of DeepSeek-V2-Lite (26 layers x
  64 experts, 1 group; ``vllm/distributed/async_eplb/data/``). The load of one
  rebalance is a block of 16 windows (2048 tokens); the drift is the move to
  the next block, across the four tasks in order (15 transitions, 3 of them a
  change of task); figures are averaged over the transitions. Experts of
  17.3 MB (DeepSeek-V2-Lite, BF16: 3 x 2048 x 1408 x 2 bytes).

Needs vLLM installed (its policy is the peer). Usage:
    python benchmarks/eplb/bench_policy.py [--quick] [--json PATH]
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
from vllm.distributed.async_eplb.rebalance_algo import rebalance_experts
from vllm.distributed.async_eplb.rebalance_algo.quality import (
    balancedness,
    new_experts_per_rank,
)

DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048  # FP8, one byte per weight
DEEPSEEK_V2_LITE_EXPERT_BYTES = 3 * 2048 * 1408 * 2  # BF16
TRACE = Path(async_eplb.__file__).resolve().parent / "data" / "loads_w128.npz"
TRACE_TASKS = ("intent", "law", "summary", "translation")
TRACE_BLOCK_WINDOWS = 16
DRIFT_SIGMA = 0.05
POLICIES = ("vllm", "default", "min_migration")
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


def trace_transitions(max_transitions: int) -> tuple[Transition, ...]:
    with np.load(TRACE) as archive:
        windows = np.concatenate([archive[task] for task in TRACE_TASKS])
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
        ("EP8 global", Geometry(80, 1, 1, 8)),
        ("EP16 global", Geometry(80, 1, 1, 16)),
    ]
    out = [
        Config(name, "lognormal", geo, DEEPSEEK_V3_EXPERT_BYTES, synthetic)
        for name, geo in v3
    ]
    out += [
        Config(name, "esft-trace", geo, DEEPSEEK_V2_LITE_EXPERT_BYTES, trace)
        for name, geo in v2_lite
    ]
    return out[:1] + out[-1:] if quick else out


def policy_functions(geo: Geometry) -> dict[str, Callable]:
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    args = (geo.replicas, geo.groups, geo.nodes, geo.ranks)

    def vllm(load: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return DefaultEplbPolicy.rebalance_experts(load, *args, old)

    def ours(policy: str) -> Callable:
        def run(load: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            return rebalance_experts(load, *args, old, policy=policy)

        return run

    return {
        "vllm": vllm,
        "default": ours("default"),
        "min_migration": ours("min_migration"),
    }


def run_config(config: Config, repeats: int) -> dict:
    geo = config.geometry
    functions = policy_functions(geo)
    times: dict[str, list[float]] = {name: [] for name in POLICIES}
    balance: dict[str, list[float]] = {name: [] for name in (*POLICIES, "stale")}
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
                start = time.perf_counter()
                placements[name] = functions[name](new_load, old).numpy()
                times[name].append(time.perf_counter() - start)
        new_np, old_np = new_load.numpy(), old.numpy()
        balance["stale"].append(float(balancedness(new_np, old_np, geo.ranks).mean()))
        for name, placement in placements.items():
            balance[name].append(
                float(balancedness(new_np, placement, geo.ranks).mean())
            )
            moved[name].append(
                float(new_experts_per_rank(old_np, placement, geo.ranks).mean())
            )
    num_layers = config.transitions[0][0].shape[0]
    time_ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    balance_mean = {name: statistics.fmean(b) for name, b in balance.items()}
    moved_per_rank = {name: statistics.fmean(m) for name, m in moved.items()}
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
        "time_ms": time_ms,
        "speedup_vs_vllm": {
            name: time_ms["vllm"] / time_ms[name]
            for name in ("default", "min_migration")
        },
        "balancedness": balance_mean,
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


def print_table(results: list[dict]) -> None:
    print(
        f"{'config':<20} {'load':<10} | {'vLLM ms':>8} {'ours ms':>8} {'mm ms':>8}"
        f" {'x def':>6} {'x mm':>6} | {'stale':>6} {'vLLM':>6} {'ours':>6}"
        f" {'mm':>6} | {'new/rank vLLM':>13} {'mm':>6} {'mm/vLLM':>7}"
        f" | {'GB vLLM':>8} {'GB mm':>7}"
    )
    for r in results:
        t, b, d = r["time_ms"], r["balancedness"], r["drift"]
        gb = {name: d[name]["bytes_moved"] / 1e9 for name in POLICIES}
        print(
            f"{r['name']:<20} {r['load']:<10} | {t['vllm']:8.1f} {t['default']:8.1f}"
            f" {t['min_migration']:8.1f} {r['speedup_vs_vllm']['default']:6.1f}"
            f" {r['speedup_vs_vllm']['min_migration']:6.2f} | {b['stale']:6.4f}"
            f" {b['vllm']:6.4f} {b['default']:6.4f} {b['min_migration']:6.4f} |"
            f" {d['vllm']['new_experts_per_rank']:13.3f}"
            f" {d['min_migration']['new_experts_per_rank']:6.3f}"
            f" {r['min_migration_vs_vllm']['moved_ratio']:7.3f}"
            f" | {gb['vllm']:8.1f} {gb['min_migration']:7.2f}"
        )
        if d["default"]["new_experts_per_rank"] != d["vllm"]["new_experts_per_rank"]:
            print(f"  WARNING: ours 'default' differs from vLLM's on {r['name']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lognormal")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 7)
    load_before = os.getloadavg()
    results = [run_config(c, repeats) for c in configs(args.quick, args.seed)]
    load_after = os.getloadavg()
    print_table(results)
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
        "configs": results,
    }
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f};"
        f" {repeats} timed runs per policy and transition"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
