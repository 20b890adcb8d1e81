"""Fleet mode's output: one row per (setting, policy), the pick, JSON, plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vllm.distributed.async_eplb.simulation.fleet import (
    RECV_CROSS,
    RECV_INTRA,
    FleetRun,
)

__all__ = [
    "best_runs",
    "format_table",
    "load_plotting",
    "summarize_run",
    "write_json",
    "write_plot",
]

COLUMNS = (
    ("gpus", "gpus", "{:d}"),
    ("redundant", "red", "{:d}"),
    ("interval", "interval", "{:d}"),
    ("window", "window", "{:d}"),
    ("policy", "policy", "{}"),
    ("mode", "mode", "{}"),
    ("balancedness", "balanced", "{:.3f}"),
    ("throughput", "MoE thr.", "{:.3f}x"),
    ("rebalances", "rebal.", "{}"),
    ("gb_per_rebalance", "GB/rebal", "{:.1f}"),
    ("max_rank_gb_received", "max rank GB in", "{:.2f}"),
    ("cross_node_share", "cross-node", "{:.0%}"),
    ("stage_s", "stage s", "{:.2f}"),
    ("stall_s", "stall s", "{}"),
    ("stall_share", "stalled", "{:.1%}"),
    ("gb_total", "GB total", "{:.0f}"),
)


def summarize_run(
    run: FleetRun, expert_bytes: int, run_seconds: float
) -> dict[str, Any]:
    """The table's numbers for one run (per rebalance: means over those done);
    ``run_seconds``: the trace's steps at the modelled step time."""
    done = run.done
    gb = expert_bytes / 1e9
    received = [r.traffic[RECV_INTRA] + r.traffic[RECV_CROSS] for r in done]
    cross = sum(int(r.traffic[RECV_CROSS].sum()) for r in done)
    moved = sum(int(x.sum()) for x in received)
    stall = [r.stage_seconds + r.policy_seconds for r in done]
    setting = run.setting
    return {
        "gpus": setting.gpus,
        "gpus_per_node": setting.gpus_per_node,
        "redundant": setting.redundant,
        "interval": setting.interval,
        "window": setting.window,
        "policy": run.policy,
        "mode": run.mode,
        "balancedness": float(run.balancedness.mean()),
        "throughput": run.relative_throughput,
        "rebalances": f"{len(done)}/{len(run.rebalances)}",
        "rebalances_done": len(done),
        "rebalances_decided": len(run.rebalances),
        "gb_per_rebalance": moved * gb / len(done) if done else 0.0,
        "max_rank_gb_received": float(np.mean([x.max() for x in received]) * gb)
        if done
        else 0.0,
        "cross_node_share": cross / moved if moved else 0.0,
        "stage_s": float(np.mean([r.stage_seconds for r in done])) if done else 0.0,
        "stall_s": f"{np.mean(stall):.2f}" if run.mode == "sync" and done else "-",
        "stall_s_max": max(stall) if run.mode == "sync" and done else 0.0,
        "stall_share": sum(stall) / run_seconds if run.mode == "sync" else 0.0,
        "policy_s_mean": float(np.mean([r.policy_seconds for r in run.rebalances]))
        if run.rebalances
        else 0.0,
        "gb_total": moved * gb,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table of ``summarize_run`` rows."""
    header = [title for _, title, _ in COLUMNS]
    cells = [[fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows]
    widths = [
        max(len(x) for x in column) for column in zip(header, *cells, strict=True)
    ]
    lines = [
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    ]
    return "\n".join(lines)


def best_runs(
    rows: Sequence[dict[str, Any]], tolerance: float = 0.01
) -> list[dict[str, Any]]:
    """Per GPU count, the row with the least traffic among those within
    ``tolerance`` of the best throughput: most throughput for least traffic."""
    picks = []
    for gpus in sorted({row["gpus"] for row in rows}):
        mine = [row for row in rows if row["gpus"] == gpus]
        best = max(row["throughput"] for row in mine)
        near = [row for row in mine if row["throughput"] >= best * (1 - tolerance)]
        picks.append(min(near, key=lambda row: (row["gb_total"], -row["throughput"])))
    return picks


def write_json(
    path: Path, config: dict[str, Any], rows: list[dict[str, Any]], runs: list[FleetRun]
) -> None:
    """Configuration, table rows and every run's balancedness series."""
    path.parent.mkdir(parents=True, exist_ok=True)
    series = [
        {
            "gpus": run.setting.gpus,
            "redundant": run.setting.redundant,
            "interval": run.setting.interval,
            "window": run.setting.window,
            "policy": run.policy,
            "balancedness": [round(float(x), 4) for x in run.balancedness],
            "rebalance_steps": [r.step for r in run.rebalances if not r.skipped],
        }
        for run in runs
    ]
    path.write_text(
        json.dumps({"config": config, "rows": rows, "series": series}, indent=1)
    )


def load_plotting() -> bool:
    """Import matplotlib (about a second) for ``write_plot``; False when it is
    missing. A caller with idle time calls it early."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError:
        return False
    return True


def write_plot(path: Path, rows: list[dict[str, Any]], runs: list[FleetRun]) -> bool:
    """Throughput against traffic (one point per run) and, for the largest
    fleet's picked setting, balancedness over the trace per policy. False
    when matplotlib is missing."""
    if not load_plotting():
        return False
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    policies = sorted({row["policy"] for row in rows})
    markers = {p: "os^Dvx*P"[i % 8] for i, p in enumerate(policies)}
    fleet_sizes = sorted({row["gpus"] for row in rows})
    colors = {g: f"C{i}" for i, g in enumerate(fleet_sizes)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for row in rows:
        left.scatter(
            row["gb_total"],
            row["throughput"],
            marker=markers[row["policy"]],
            color=colors[row["gpus"]],
            s=40,
        )
        left.annotate(
            f"r{row['redundant']} i{row['interval']}",
            (row["gb_total"], row["throughput"]),
            fontsize=6,
            alpha=0.7,
        )
    for policy in policies:
        left.scatter([], [], marker=markers[policy], color="gray", label=policy)
    for gpus in fleet_sizes:
        left.scatter([], [], marker="s", color=colors[gpus], label=f"{gpus} GPUs")
    left.set_xscale("symlog")
    left.set_xlabel("expert bytes moved over the trace, GB (all ranks)")
    left.set_ylabel("MoE throughput relative to no EPLB")
    left.set_title("throughput against traffic (r: redundant, i: interval)")
    left.legend(fontsize=7)
    pick = best_runs([r for r in rows if r["gpus"] == fleet_sizes[-1]])[0]
    for run in runs:
        s = run.setting
        if (s.gpus, s.redundant, s.interval, s.window) == (
            pick["gpus"],
            pick["redundant"],
            pick["interval"],
            pick["window"],
        ):
            right.plot(run.balancedness, label=run.policy, lw=1)
    right.set_xlabel("trace window")
    right.set_ylabel("balancedness")
    right.set_title(
        f"{pick['gpus']} GPUs, {pick['redundant']} redundant, interval "
        f"{pick['interval']}, window {pick['window']}"
    )
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
