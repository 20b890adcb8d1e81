"""``async-eplb-simulate``: launch N ranks, run the deployment, report.

The parent validates the configuration and estimates its memory first (bad
input, or a run that would not fit in the memory available, is one line on
stderr, exit status 2), starts one process per rank (``launch.py``), then
prints the summary and writes the JSON report and the plot from rank 0's
result; when a rank dies, from what the ranks had done so far.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vllm.distributed.async_eplb.config import POLICIES
from vllm.distributed.async_eplb.simulation import compare, vllm_baseline
from vllm.distributed.async_eplb.simulation.launch import (
    RankFailed,
    compile_policy,
    compiled_line,
    launch,
)
from vllm.distributed.async_eplb.simulation.memory import (
    MemoryEstimate,
    available_bytes,
    gb,
)
from vllm.distributed.async_eplb.simulation.presets import PRESETS
from vllm.distributed.async_eplb.simulation.report import (
    format_summary,
    summarize,
    write_json,
    write_plot,
)
from vllm.distributed.async_eplb.simulation.runner import LOADS, MODES, SimConfig
from vllm.distributed.async_eplb.transports import TRANSPORT_NAMES

__all__ = ["build_parser", "main"]

PROG = "async-eplb-simulate"


def _layers(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer or 'all', got {value!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Simulated expert-parallel MoE deployment: N CPU ranks (gloo) run the "
            "real async_eplb EplbState under a toy MoE decode loop with real, "
            "moving expert weights. --device cuda runs the same on GPUs: one "
            "per rank, or ranks sharing GPUs round-robin (then the model's "
            "all-reduce uses gloo and --transport p2p is refused)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--preset",
        default=defaults.preset,
        choices=sorted(PRESETS),
        help="model geometry, from the real config",
    )
    add(
        "--layers",
        type=_layers,
        default=defaults.layers,
        help="MoE layers simulated: the first N of the preset, or 'all'",
    )
    add("--ranks", type=int, default=defaults.ranks, help="EP ranks (processes)")
    add(
        "--redundant",
        type=int,
        default=defaults.redundant,
        help="redundant expert slots in total",
    )
    add("--steps", type=int, default=defaults.steps, help="decode steps")
    add(
        "--step-interval",
        type=int,
        default=defaults.step_interval,
        help="steps between rebalances (vLLM's eplb step_interval)",
    )
    add(
        "--window",
        type=int,
        default=defaults.window,
        help="steps of load the rebalance looks at (vLLM's eplb window_size)",
    )
    add("--tokens", type=int, default=defaults.tokens, help="tokens per step")
    add(
        "--scale",
        type=float,
        default=defaults.scale,
        help="fraction of a real expert's elements each toy expert holds",
    )
    add("--policy", default=defaults.policy, choices=POLICIES, help="placement policy")
    add(
        "--transport",
        default=defaults.transport,
        choices=TRANSPORT_NAMES,
        help="how staged experts travel",
    )
    add(
        "--mode",
        default=defaults.mode,
        choices=MODES,
        help="async: stage in the background, commit a layer per step; "
        "sync: move everything inside one step",
    )
    add(
        "--load",
        default=defaults.load,
        choices=LOADS,
        help="auto: replay the shipped DeepSeek-V2-Lite trace where the "
        "geometry fits (or --trace when given), else synthetic drifting load",
    )
    add(
        "--trace",
        default=None,
        metavar="PATH",
        help="expert-load trace (.npz/.npy, [windows, layers, experts]) to replay",
    )
    add(
        "--record",
        default=None,
        metavar="PATH",
        help="write the expert load (.npz, replayable with --trace) at every "
        "rebalance and at the end, as VLLM_ASYNC_EPLB_RECORD does",
    )
    add(
        "--init-placement",
        default=None,
        metavar="PATH",
        help="start from this placement or load file (our recording, SGLang's "
        "logical_count / physical_to_logical_map), as "
        "VLLM_ASYNC_EPLB_INIT_PLACEMENT does",
    )
    add("--seed", type=int, default=defaults.seed, help="seed of load and weights")
    add(
        "--device",
        default=defaults.device,
        choices=("cpu", "cuda"),
        help="cuda: one GPU per rank, or ranks share GPUs round-robin",
    )
    add("--out", default=defaults.out, help="directory for report.json and plot.png")
    add("--no-progress", action="store_true", help="no progress bar")
    add(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="first run vLLM's own EplbState (sync, its default policy) on the "
        "same ranks, model, load and seed, then ours, and show both side by "
        "side; default: on when vLLM is installed and --device is cpu",
    )
    return parser


def _config(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        preset=args.preset,
        layers=args.layers,
        ranks=args.ranks,
        redundant=args.redundant,
        steps=args.steps,
        step_interval=args.step_interval,
        window=args.window,
        tokens=args.tokens,
        scale=args.scale,
        policy=args.policy,
        transport=args.transport,
        mode=args.mode,
        load=args.load,
        trace=args.trace,
        record=args.record,
        init_placement=args.init_placement,
        seed=args.seed,
        device=args.device,
        out=args.out,
    )


def _compare(args: argparse.Namespace, config: SimConfig) -> bool:
    """--compare as asked; by default, on where vLLM's EplbState can run."""
    if args.compare is not None:
        return args.compare
    return config.device == "cpu" and vllm_baseline.available()


def check_memory(estimate: MemoryEstimate) -> int:
    """The memory available; ValueError (one line) when the run needs more."""
    available, source = available_bytes()
    if estimate.total > available:
        raise ValueError(
            f"this run needs about {gb(estimate.total)} GB ({estimate.ranks} ranks "
            f"x {gb(estimate.per_rank)} GB) but {gb(available)} GB is available "
            f"({source}); fewer --layers, a smaller --scale or fewer --ranks "
            f"reduce it"
        )
    return available


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--fleet" in argv:  # fleet mode (no ranks): its own options
        from vllm.distributed.async_eplb.simulation import fleet_cli

        return fleet_cli.main([arg for arg in argv if arg != "--fleet"])
    args = build_parser().parse_args(argv)
    config = _config(args)
    try:
        config.validate()
        if _compare(args, config):
            compare.baseline_config(config).validate()
        load = config.make_load().description
        estimate = config.memory_estimate()
        available = check_memory(estimate)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    model = config.model
    print(
        f"{model.name}: {model.num_moe_layers} MoE layers x "
        f"{model.num_routed_experts} experts (top-{model.top_k}) + "
        f"{config.redundant} redundant slots on {config.ranks} {config.device} "
        f"ranks, {config.mode} mode, policy {config.policy}, transport "
        f"{config.transport}\nload: {load}\nmemory: {estimate.describe()}; "
        f"{gb(available)} GB available",
        flush=True,
    )
    memory = {
        "estimate_parts": estimate.parts,
        "estimate_per_rank": estimate.per_rank,
        "estimate_total": estimate.total,
        "available_at_start": available,
    }
    if _compare(args, config):
        return compare.run(
            config, progress=not args.no_progress, started=started, memory=memory
        )
    print(compiled_line(compile_policy(config)), flush=True)
    try:
        result = launch(config, progress=not args.no_progress)
    except RankFailed as exc:
        # The partial report: what the ranks had done when one of them died.
        result = exc.partial
        failure = str(exc)
        print(f"the run stopped: {failure}; partial report follows", flush=True)
    else:
        failure = None
    result.wall_seconds = time.perf_counter() - started
    result.memory.update(memory)
    summary = summarize(result)
    out = Path(config.out)
    write_json(out / "report.json", result, summary)
    print(format_summary(summary))
    print(f"run time {result.wall_seconds:.1f} s (start-up of the ranks included)")
    print(f"report: {out / 'report.json'}")
    if config.record is not None:
        print(f"recording: {config.record} (replay it with --trace)")
    if write_plot(out / "plot.png", result):
        print(f"plot: {out / 'plot.png'}")
    else:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
    if failure is not None:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
        return 1
    return 0 if summary["outputs_matched"] == summary["outputs_checked"] else 1
