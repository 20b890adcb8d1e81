"""``--compare``: vLLM's EPLB and ours side by side, from two runs' results.

The same ranks, model, trace and seed run twice (vLLM's ``EplbState`` through
``vllm_baseline.py``, then ours); each run's ``SimulationResult`` is measured
the same way, and the functions here turn the pair into one table and one
overlaid plot. Pure functions of the results, tested without processes.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vllm.distributed.async_eplb.simulation.report import (
    SimulationResult,
    percentile,
    rolling_mean,
    summarize,
    write_json,
)

__all__ = [
    "LABELS",
    "baseline_config",
    "compare_summary",
    "experts_received",
    "format_comparison",
    "run",
    "write_compare_plot",
]

LABELS = {"vllm": "vLLM EplbState", "ours": "async_eplb"}
PROG = "async-eplb-simulate"


def experts_received(
    old: torch.Tensor, new: torch.Tensor, num_ranks: int
) -> torch.Tensor:
    """Per rank, the experts it must fetch from another rank to go from the
    ``old`` to the ``new`` placement (``[layers, slots]`` phy2log): distinct
    (layer, expert) pairs in its new slots that it held in none of its old
    ones (a copy between its own slots moves nothing over the wire). ``[ranks]``.
    """
    if old.shape != new.shape or old.dim() != 2 or old.shape[1] % num_ranks:
        raise ValueError(
            f"placements must be [layers, slots] of one shape with slots "
            f"divisible by {num_ranks} ranks, got {tuple(old.shape)} and "
            f"{tuple(new.shape)}"
        )
    layers = old.shape[0]
    old_r = old.reshape(layers, num_ranks, -1).to(torch.int64)
    new_r = new.reshape(layers, num_ranks, -1).to(torch.int64)
    experts = int(max(int(old.max()), int(new.max()))) + 1
    held = torch.zeros(layers, num_ranks, experts, dtype=torch.bool)
    held.scatter_(2, old_r.clamp_min(0), True)
    wanted = torch.zeros_like(held)
    wanted.scatter_(2, new_r.clamp_min(0), True)
    return (wanted & ~held).sum(dim=(0, 2))


def _split(values: list[float], busy: list[bool]) -> tuple[list[float], list[float]]:
    steady = [v for v, b in zip(values, busy, strict=True) if not b]
    during = [v for v, b in zip(values, busy, strict=True) if b]
    return steady, during


def compare_summary(result: SimulationResult) -> dict[str, Any]:
    """One implementation's column: the figures of the side-by-side table."""
    base = summarize(result)
    steady, during = _split(result.eplb_seconds, result.in_rebalance)
    typical = percentile(result.step_seconds, 50)
    rebalances = int(base.get("rebalances", 0) or 0)
    experts = sum(result.experts_received)
    moved = sum(result.bytes_received)
    steps = len(result.blocking_collectives)
    checked, matched = result.outputs_checked, result.outputs_matched
    return {
        "mode": result.config.get("mode"),
        "balancedness_after": base["balancedness_after"],
        "balancedness_unmoved_same_steps": base["balancedness_unmoved_same_steps"],
        "added_ms_steady_p50": 1e3 * percentile(steady, 50),
        "added_ms_steady_p99": 1e3 * percentile(steady, 99),
        "added_ms_steady_max": 1e3 * max(steady, default=math.nan),
        "added_ms_rebalance_p50": 1e3 * percentile(during, 50),
        "added_ms_rebalance_p99": 1e3 * percentile(during, 99),
        "added_ms_rebalance_max": 1e3 * max(during, default=math.nan),
        "longest_stall_ms": 1e3
        * (max(result.step_seconds, default=math.nan) - typical),
        "rebalances": rebalances,
        "experts_moved_per_rebalance": experts / rebalances if rebalances else math.nan,
        "bytes_moved_per_rebalance": moved / rebalances if rebalances else math.nan,
        "bytes_moved": moved,
        "blocking_collectives_per_step": (
            sum(result.blocking_collectives) / steps if steps else math.nan
        ),
        "blocking_collectives_max_step": max(result.blocking_collectives, default=0),
        "outputs_checked": checked,
        "outputs_matched": matched,
        "verified": bool(checked) and checked == matched == len(result.balancedness),
    }


_ROWS = (
    ("balancedness after rebalancing", "balancedness_after", "{:.3f}"),
    (
        "  same steps, placement never moved",
        "balancedness_unmoved_same_steps",
        "{:.3f}",
    ),
    ("added ms/step, steady p50", "added_ms_steady_p50", "{:.3f}"),
    ("added ms/step, steady p99", "added_ms_steady_p99", "{:.3f}"),
    ("added ms/step, steady max", "added_ms_steady_max", "{:.3f}"),
    ("added ms/step, rebalancing p50", "added_ms_rebalance_p50", "{:.3f}"),
    ("added ms/step, rebalancing p99", "added_ms_rebalance_p99", "{:.3f}"),
    ("added ms/step, rebalancing max", "added_ms_rebalance_max", "{:.3f}"),
    ("longest single stall ms", "longest_stall_ms", "{:.1f}"),
    ("rebalances", "rebalances", "{}"),
    ("experts moved per rebalance", "experts_moved_per_rebalance", "{:.1f}"),
    ("bytes moved per rebalance", "bytes_moved_per_rebalance", None),
    ("blocking collectives per step", "blocking_collectives_per_step", "{:.3f}"),
    ("  most in one step", "blocking_collectives_max_step", "{}"),
)


def _cell(value: Any, fmt: str | None) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if fmt is None:
        return _mib(value)
    return fmt.format(value)


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB" if value >= 2**18 else f"{value / 2**10:.1f} KiB"


def format_comparison(columns: dict[str, dict[str, Any]]) -> str:
    """The side-by-side table: one column per implementation, then the notes."""
    heads = [
        f"{LABELS.get(name, name)} ({col['mode']})" for name, col in columns.items()
    ]
    table = [("", *heads)]
    for label, key, fmt in _ROWS:
        table.append((label, *(_cell(col[key], fmt) for col in columns.values())))
    table.append(
        (
            "outputs verified (bit-exact)",
            *(
                f"{c['outputs_matched']}/{c['outputs_checked']} "
                f"{'OK' if c['verified'] else 'MISMATCH'}"
                for c in columns.values()
            ),
        )
    )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    lines.append(
        "added ms: EplbState.step() alone, slowest rank; stall: the slowest whole "
        "step minus the median one; experts/bytes moved: fetched from another "
        "rank, from the placements; blocking collectives: called by the "
        "forward thread inside step() without async_op"
    )
    return "\n".join(lines)


def write_compare_plot(path: Path, results: dict[str, SimulationResult]) -> bool:
    """Balancedness, added time per step and bytes moved, both runs overlaid.

    Returns False, writing nothing, when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"vllm": "tab:orange", "ours": "tab:blue"}
    fig, (top, middle, bottom) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    first = next(iter(results.values()))
    steps = range(len(first.balancedness_unmoved))
    top.plot(
        steps,
        rolling_mean(first.balancedness_unmoved, 8),
        color="0.5",
        label="placement never moved",
    )
    for name, result in results.items():
        color = colors.get(name)
        label = f"{LABELS.get(name, name)} ({result.config.get('mode')})"
        own = range(len(result.balancedness))
        top.plot(own, rolling_mean(result.balancedness, 8), color=color, label=label)
        middle.plot(
            own, [1e3 * t for t in result.eplb_seconds], color=color, label=label
        )
        total, cumulative = 0, []
        for value in result.bytes_received:
            total += value
            cumulative.append(total / 2**20)
        bottom.plot(own, cumulative, color=color, label=label)
    top.set_ylabel("balancedness\n(8-step mean)")
    top.set_ylim(0, 1.02)
    middle.set_ylabel("added ms per step\n(EplbState.step)")
    middle.set_yscale("symlog", linthresh=1.0)
    middle.set_ylim(bottom=0)
    bottom.set_ylabel("MiB moved\n(cumulative)")
    bottom.set_xlabel("step")
    for axis in (top, middle, bottom):
        axis.legend(loc="best", fontsize="small")
    config = first.config
    top.set_title(
        f"vLLM's EPLB and async_eplb: {config.get('preset')}, "
        f"{config.get('layers')} layers, {config.get('ranks')} ranks, "
        f"{config.get('redundant')} redundant",
        fontsize="medium",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def baseline_config(config: Any) -> Any:
    """The same run with vLLM's EplbState: sync mode (its async cannot run on
    CPU ranks), vLLM's default policy (set in ``vllm_baseline.py``), and no
    recording (``--record`` records our run)."""
    return dataclasses.replace(config, implementation="vllm", mode="sync", record=None)


def run(config: Any, *, progress: bool, started: float, memory: dict) -> int:
    """Both runs, one after the other, then the table, report and plot.

    Exit status 0 only when both finished and both verified bit-exact.
    """
    from vllm.distributed.async_eplb.simulation import vllm_baseline
    from vllm.distributed.async_eplb.simulation.launch import (
        RankFailed,
        compile_policy,
        compiled_line,
        launch,
    )

    imported = time.perf_counter()
    vllm_baseline.preload()  # once, in the parent: the forked ranks share it
    print(f"vLLM imported in {time.perf_counter() - imported:.1f} s", flush=True)
    runs = {"vllm": baseline_config(config), "ours": config}
    results: dict[str, SimulationResult] = {}
    for index, (name, run_config) in enumerate(runs.items(), 1):
        print(
            f"run {index}/2: {LABELS[name]}, {run_config.mode} mode, policy "
            f"{'default' if name == 'vllm' else run_config.policy}",
            flush=True,
        )
        run_started = time.perf_counter()
        if name == "ours":
            print(f"  {compiled_line(compile_policy(run_config))}", flush=True)
        try:
            results[name] = launch(run_config, progress=progress)
        except RankFailed as exc:
            print(f"{PROG}: error: {LABELS[name]}: {exc}", file=sys.stderr)
            return 1
        results[name].wall_seconds = time.perf_counter() - run_started
        print(f"  done in {results[name].wall_seconds:.1f} s", flush=True)
        results[name].memory.update(memory)
    columns = {name: compare_summary(result) for name, result in results.items()}
    print(format_comparison(columns))
    print(vllm_baseline.ASYNC_MISSING)
    seconds = time.perf_counter() - started
    print(f"run time {seconds:.1f} s (both runs, start-ups included)")
    out = Path(config.out)
    ours = results["ours"]
    write_json(
        out / "report.json",
        ours,
        summarize(ours),
        compare={
            "columns": columns,
            "vllm_async": vllm_baseline.ASYNC_MISSING,
            "baseline": dataclasses.asdict(results["vllm"]),
        },
    )
    print(f"report: {out / 'report.json'}")
    if write_compare_plot(out / "plot.png", results):
        print(f"plot: {out / 'plot.png'}")
    else:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
    return 0 if all(column["verified"] for column in columns.values()) else 1
