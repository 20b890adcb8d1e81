"""``async-eplb-simulate --fleet``: the fleet mode's options and its run.

Bad input is one line on stderr and exit status 2, as in the simulator.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.rebalance_algo import POLICIES
from vllm.distributed.async_eplb.simulation.fleet import (
    COPY_GBPS,
    CROSS_NODE_GBPS,
    INTRA_NODE_GBPS,
    VLLM_POLICY,
    Geometry,
    Links,
    geometry_from_config,
    rebalance_steps,
    sweep_settings,
    synthetic_trace,
    vllm_available,
)
from vllm.distributed.async_eplb.simulation.fleet_report import (
    best_runs,
    format_table,
    load_plotting,
    summarize_run,
    write_json,
    write_plot,
)
from vllm.distributed.async_eplb.simulation.fleet_sweep import (
    SweepInputs,
    default_jobs,
    make_units,
    run_sweep,
)
from vllm.distributed.async_eplb.simulation.load import (
    SHIPPED_TRACE,
    map_trace_geometry,
    read_trace,
)
from vllm.distributed.async_eplb.simulation.presets import PRESETS, get_preset

__all__ = ["build_parser", "main"]

PROG = "async-eplb-simulate --fleet"
SWEEP_KEYS = ("gpus", "redundant", "interval", "window")


def _ints(value: str) -> list[int]:
    try:
        values = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers, got {value!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"no value in {value!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Fleet mode: replay a load trace through the real placement "
            "policies (vLLM's and ours) and the real transfer planner at the "
            "deployment's size; no weights move. Prints one row per setting "
            "and policy, writes report.json and plot.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--preset", default="deepseek-v3", choices=sorted(PRESETS))
    add(
        "--model-config",
        default=None,
        metavar="PATH",
        help="a Hugging Face config.json of a MoE model, instead of --preset",
    )
    add(
        "--bytes-per-element",
        type=int,
        default=None,
        help="bytes of one expert weight element (default: the preset's "
        "checkpoint, FP8 1 for DeepSeek-V3; 1 with --model-config)",
    )
    add("--gpus", type=_ints, default=[64], help="EP ranks, comma-separated")
    add("--gpus-per-node", type=int, default=8)
    add("--redundant", type=_ints, default=[32], help="redundant slots in total")
    add(
        "--interval",
        type=_ints,
        default=[3000],
        help="steps between rebalances (vLLM's step_interval)",
    )
    add(
        "--window",
        type=_ints,
        default=[1000],
        help="steps of load a rebalance looks at (vLLM's window_size)",
    )
    add(
        "--sweep",
        nargs="+",
        default=[],
        metavar="KEY=V1,V2",
        help=f"values to sweep, keys {', '.join(SWEEP_KEYS)} (the same as "
        "giving the option a list)",
    )
    policies = [VLLM_POLICY, *POLICIES]
    add(
        "--policies",
        default=",".join(policies),
        help=f"comma-separated, of {', '.join(policies)} ({VLLM_POLICY}: "
        "vLLM's own DefaultEplbPolicy in sync mode; the others ours, async)",
    )
    add(
        "--trace",
        default=None,
        metavar="PATH",
        help="load trace (.npz/.npy [windows, layers, experts], our "
        "recordings, SGLang logical_count); default: the shipped "
        "DeepSeek-V2-Lite trace mapped onto the geometry",
    )
    add(
        "--synthetic",
        type=int,
        default=None,
        metavar="WINDOWS",
        help="synthetic drifting load of this many windows instead of a trace",
    )
    add(
        "--windows",
        type=int,
        default=None,
        help="replay this many trace windows (the trace repeated or cut)",
    )
    add(
        "--steps-per-window",
        type=int,
        default=100,
        help="decode steps one trace window stands for",
    )
    add(
        "--step-ms",
        type=float,
        default=50.0,
        help="decode step time without EPLB (an assumption): turns staging "
        "time into steps and a stall into a share of time",
    )
    add("--copy-gbps", type=float, default=round(COPY_GBPS, 1))
    add("--intra-node-gbps", type=float, default=INTRA_NODE_GBPS)
    add(
        "--cross-node-gbps",
        type=float,
        default=CROSS_NODE_GBPS,
        help="default: the measured host path (pinned host memory + gloo); "
        "45 for NCCL over a 400 Gb/s adapter (assumed)",
    )
    add("--min-gain", type=float, default=AsyncEplbConfig.min_gain)
    add("--seed", type=int, default=0)
    add("--out", default="eplb-fleet-out")
    add(
        "--jobs",
        type=int,
        default=default_jobs(),
        help="worker processes (default: the cores); the runs are independent, "
        "so any number gives the same report",
    )
    add("--no-progress", action="store_true")
    return parser


def _apply_sweep(args: argparse.Namespace) -> None:
    for item in args.sweep:
        key, sep, values = item.partition("=")
        if not sep or key not in SWEEP_KEYS:
            raise ValueError(
                f"--sweep item {item!r} must be KEY=V1,V2 with KEY one of "
                f"{', '.join(SWEEP_KEYS)}"
            )
        try:
            setattr(args, key, _ints(values))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--sweep {key}: {exc}") from None


def _geometry(args: argparse.Namespace) -> Geometry:
    if args.model_config is not None:
        return geometry_from_config(args.model_config, args.bytes_per_element or 1)
    preset = get_preset(args.preset)
    return Geometry.from_preset(preset, args.bytes_per_element or preset.weight_bytes)


def _trace(args: argparse.Namespace, geometry: Geometry) -> tuple[np.ndarray, str]:
    shape = (geometry.num_layers, geometry.num_experts)
    if args.synthetic is not None:
        trace = synthetic_trace(args.synthetic, *shape, seed=args.seed)
        what = f"synthetic drift, {args.synthetic} windows"
    else:
        path = Path(args.trace) if args.trace else SHIPPED_TRACE
        raw = read_trace(path)
        trace = map_trace_geometry(raw, *shape, seed=args.seed)
        what = f"{path.name} ({raw.shape[0]} windows x {raw.shape[1]} x {raw.shape[2]})"
        if raw.shape[1:] != shape:
            what += f" mapped to {shape[0]} x {shape[1]}"
    if args.windows is not None:
        if args.windows <= 0:
            raise ValueError(f"--windows must be > 0, got {args.windows}")
        index = np.arange(args.windows) % trace.shape[0]
        what += f", {args.windows} windows replayed"
        if args.windows > trace.shape[0]:
            what += " (repeated)"
        trace = trace[index]
    return trace, what


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar, or None when off or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="rebalance", file=sys.stderr, mininterval=1.0)


def _process_seconds() -> float | None:
    """Wall time since this process started (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    return time.time() - psutil.Process().create_time()


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        _apply_sweep(args)
        geometry = _geometry(args)
        links = Links(args.copy_gbps, args.intra_node_gbps, args.cross_node_gbps)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        known = [VLLM_POLICY, *POLICIES]
        for policy in policies:
            if policy not in known:
                raise ValueError(f"unknown policy {policy!r}; known: {known}")
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        if not args.steps_per_window > 0 or not args.step_ms > 0:
            raise ValueError(
                "--steps-per-window and --step-ms must be > 0, got "
                f"{args.steps_per_window}, {args.step_ms}"
            )
        settings, notes = sweep_settings(
            args.gpus,
            args.redundant,
            args.interval,
            args.window,
            args.gpus_per_node,
            geometry,
        )
        if not settings:
            raise ValueError("no setting can be simulated: " + "; ".join(notes))
        trace, trace_text = _trace(args, geometry)
    except ValueError as exc:
        print(f"async-eplb-simulate: error: {exc}", file=sys.stderr)
        return 2
    if VLLM_POLICY in policies and not vllm_available():
        policies.remove(VLLM_POLICY)
        notes.append("vLLM's policy left out: vLLM is not importable here")
    print(
        f"{geometry.name}: {geometry.num_layers} MoE layers x "
        f"{geometry.num_experts} experts ({geometry.num_groups} groups, "
        f"top-{geometry.top_k}), {geometry.expert_bytes / 1e6:.1f} MB an expert\n"
        f"load: {trace_text}; {args.steps_per_window} steps a window, "
        f"{trace.shape[0] * args.steps_per_window} steps, {args.step_ms} ms a step\n"
        f"links GB/s: copy {links.copy_gbps:.0f}, intra-node "
        f"{links.intra_node_gbps:g}, cross-node {links.cross_node_gbps:g}"
        + (" (measured host path)" if links.cross_node_gbps == CROSS_NODE_GBPS else ""),
        flush=True,
    )
    total_steps = trace.shape[0] * args.steps_per_window
    bar = _progress(
        len(policies)
        * sum(len(rebalance_steps(total_steps, s.interval)) for s in settings),
        not args.no_progress,
    )
    inputs = SweepInputs(
        trace, geometry, links, args.steps_per_window, args.step_ms / 1e3, args.min_gain
    )
    try:
        runs = run_sweep(
            make_units(settings, policies),
            inputs,
            args.jobs,
            on_rebalance=None if bar is None else bar.update,
            while_waiting=load_plotting,
        )
    finally:
        if bar is not None:
            bar.close()
    run_seconds = total_steps * args.step_ms / 1e3
    rows = [summarize_run(run, geometry.expert_bytes, run_seconds) for run in runs]
    print(format_table(rows))
    for note in notes:
        print(note)
    for pick in best_runs(rows):
        print(
            f"most throughput for least traffic on {pick['gpus']} GPUs: "
            f"{pick['policy']}, {pick['redundant']} redundant, interval "
            f"{pick['interval']}, window {pick['window']}: {pick['throughput']:.3f}x, "
            f"{pick['gb_total']:.0f} GB moved"
        )
    out = Path(args.out)
    config = {key: value for key, value in vars(args).items() if key not in ("sweep",)}
    config.update(geometry=vars(geometry), trace_text=trace_text, notes=notes)
    write_json(out / "report.json", config, rows, runs)
    print(f"report: {out / 'report.json'}")
    if write_plot(out / "plot.png", rows, runs):
        print(f"plot: {out / 'plot.png'}")
    else:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
    since_start = _process_seconds()
    print(
        f"run time {time.perf_counter() - started:.1f} s"
        + (
            ""
            if since_start is None
            else f" ({since_start:.1f} s since the process started, imports included)"
        )
        + f", {args.jobs} job{'s' if args.jobs > 1 else ''}"
    )
    return 0
