"""``async-eplb-simulate``: launch N ranks, run the deployment, report.

The parent validates the configuration first (bad input is one line on
stderr, exit status 2), starts one process per rank (gloo on CPU, NCCL plus
gloo with ``--device cuda``), then prints the summary and writes the JSON
report and the plot from rank 0's result.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from vllm.distributed.async_eplb.config import POLICIES
from vllm.distributed.async_eplb.simulation.presets import PRESETS
from vllm.distributed.async_eplb.simulation.report import (
    SimulationResult,
    format_summary,
    summarize,
    write_json,
    write_plot,
)
from vllm.distributed.async_eplb.simulation.runner import (
    LOADS,
    MODES,
    SimConfig,
    run_rank,
)
from vllm.distributed.async_eplb.transports import TRANSPORT_NAMES

__all__ = ["build_parser", "main"]

PROG = "async-eplb-simulate"
_RESULT_FILE = "result.pkl"


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


def _rank_main(
    rank: int, config: SimConfig, init_method: str, result_dir: str, progress: bool
) -> None:
    """Entry of one rank process: CPU threads shared fairly, result pickled."""
    if config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.ranks))
    logging.basicConfig(
        level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s"
    )
    result = run_rank(rank, config, init_method, show_progress=progress)
    if result is not None:
        with open(Path(result_dir) / _RESULT_FILE, "wb") as file:
            pickle.dump(result, file)


def _start_method(config: SimConfig) -> str:
    """fork on CPU: ranks inherit the parent's imports (vLLM's, when installed,
    take seconds per process); spawn for CUDA, which must not be forked."""
    if config.device == "cpu" and "fork" in mp.get_all_start_methods():
        return "fork"
    return "spawn"


def _launch(config: SimConfig, progress: bool) -> SimulationResult:
    """Start the ranks; a failed rank raises RuntimeError with its last line."""
    with tempfile.TemporaryDirectory(prefix="eplb-sim-") as result_dir:
        # A file rendezvous: no port to pick, so parallel runs cannot clash.
        init_method = f"file://{Path(result_dir) / 'rendezvous'}"
        try:
            mp.start_processes(
                _rank_main,
                args=(config, init_method, result_dir, progress),
                nprocs=config.ranks,
                join=True,
                start_method=_start_method(config),
            )
        except mp.ProcessRaisedException as exc:
            log = Path(config.out) / "error.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(str(exc))
            last = [line for line in str(exc).splitlines() if line.strip()][-1]
            raise RuntimeError(
                f"rank {exc.error_index} failed: {last} (traceback in {log})"
            ) from None
        except mp.ProcessExitedException as exc:
            raise RuntimeError(
                f"rank {exc.error_index} exited with code {exc.exit_code}"
            ) from None
        with open(Path(result_dir) / _RESULT_FILE, "rb") as file:
            return pickle.load(file)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    config = _config(args)
    try:
        config.validate()
        load = config.make_load().description
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    model = config.model
    print(
        f"{model.name}: {model.num_moe_layers} MoE layers x "
        f"{model.num_routed_experts} experts (top-{model.top_k}) + "
        f"{config.redundant} redundant slots on {config.ranks} {config.device} "
        f"ranks, {config.mode} mode, policy {config.policy}, transport "
        f"{config.transport}\nload: {load}",
        flush=True,
    )
    try:
        result = _launch(config, progress=not args.no_progress)
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    result.wall_seconds = time.perf_counter() - started
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
    return 0 if summary["outputs_matched"] == summary["outputs_checked"] else 1
