"""What a simulated run shows: summary table, JSON report and plot.

Pure functions of a ``SimulationResult`` (gathered on rank 0), so they are
tested without processes. matplotlib is imported only to draw the plot, and
the run still writes its JSON report when it is missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SimulationResult",
    "format_summary",
    "percentile",
    "rolling_mean",
    "summarize",
    "write_json",
    "write_plot",
]


@dataclass
class SimulationResult:
    """Per-step series (one entry per step) and counters of one run.

    Times are the slowest rank's at each step: it sets the step time of an
    expert-parallel deployment.
    """

    config: dict[str, Any]
    balancedness: list[float]
    """Measured: mean/max tokens per rank under the placement in force."""
    balancedness_unmoved: list[float]
    """The same load on the initial placement, never rebalanced."""
    step_seconds: list[float]
    """Whole step: forward plus ``EplbState.step()``."""
    eplb_seconds: list[float]
    """Added by EPLB: ``EplbState.step()`` alone."""
    in_rebalance: list[bool]
    """A rebalance was in flight (decided, not all layers committed)."""
    committed_layers: list[int]
    """Layers whose placement changed at this step."""
    outputs_checked: int
    outputs_matched: int
    counters: dict[str, float] = field(default_factory=dict)
    """EplbState's counters: rebalances, skips, aborts, bytes moved, ..."""
    wall_seconds: float = 0.0
    memory: dict[str, Any] = field(default_factory=dict)
    """Estimated and measured host memory (bytes): each rank's peak RSS, the
    run's peak in all (sampled by the launcher), the estimate's parts."""
    partial: dict[str, Any] | None = None
    """None for a finished run; else how far it got (a rank died)."""
    experts_received: list[int] = field(default_factory=list)
    """Experts fetched from another rank at this step, all ranks (from the maps)."""
    bytes_received: list[int] = field(default_factory=list)
    """The same in bytes of expert weights."""
    blocking_collectives: list[int] = field(default_factory=list)
    """Blocking collectives the forward thread made inside ``step()``."""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def rolling_mean(values: list[float], width: int) -> list[float]:
    """Mean of each value and the ``width - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _first_settled_step(result: SimulationResult) -> int | None:
    """The step after the first rebalance that changed a layer had finished.

    That is the end of the in-flight run holding the first commit (a sync
    rebalance commits everything within one step).
    """
    first_commit = next((s for s, n in enumerate(result.committed_layers) if n), None)
    if first_commit is None:
        return None
    end = first_commit + 1
    while end < len(result.in_rebalance) and result.in_rebalance[end]:
        end += 1
    return end


def summarize(result: SimulationResult) -> dict[str, Any]:
    """The figures of the summary table, as a JSON-ready dict."""
    settled = _first_settled_step(result)
    steps = len(result.balancedness)
    before = result.balancedness[: settled if settled is not None else steps]
    after = result.balancedness[settled:] if settled is not None else []
    unmoved_after = result.balancedness_unmoved[settled:] if settled is not None else []
    steady = [
        t
        for t, busy in zip(result.eplb_seconds, result.in_rebalance, strict=True)
        if not busy
    ]
    busy = [
        t
        for t, busy in zip(result.eplb_seconds, result.in_rebalance, strict=True)
        if busy
    ]
    return {
        "steps": steps,
        "balancedness_before": _mean(before),
        "balancedness_after": _mean(after),
        "balancedness_unmoved_same_steps": _mean(unmoved_after),
        "first_rebalanced_step": settled,
        "layer_commits": sum(result.committed_layers),
        "steps_in_rebalance": len(busy),
        "added_ms_steady_p50": 1e3 * percentile(steady, 50),
        "added_ms_steady_p99": 1e3 * percentile(steady, 99),
        "added_ms_rebalance_p50": 1e3 * percentile(busy, 50),
        "added_ms_rebalance_p99": 1e3 * percentile(busy, 99),
        "added_ms_max": 1e3 * max(result.eplb_seconds, default=math.nan),
        "step_ms_p50": 1e3 * percentile(result.step_seconds, 50),
        "outputs_checked": result.outputs_checked,
        "outputs_matched": result.outputs_matched,
        "wall_seconds": result.wall_seconds,
        "peak_rss_max_rank": max(
            result.memory.get("peak_rss_per_rank", {}).values(), default=None
        ),
        "peak_in_use_all": result.memory.get("peak_in_use_all"),
        **result.counters,
        **({"partial": result.partial} if result.partial is not None else {}),
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """A fixed-width table plus the verification line."""
    counters = ("rebalances", "skips", "aborts")
    rows = [
        ("balancedness before (initial placement)", summary["balancedness_before"]),
        ("balancedness after (once rebalanced)", summary["balancedness_after"]),
        (
            "  same steps, placement never moved",
            summary["balancedness_unmoved_same_steps"],
        ),
        *((name, summary.get(name, "n/a")) for name in counters),
        ("layer commits", summary["layer_commits"]),
        ("bytes moved (all ranks)", _bytes(summary.get("bytes_moved"))),
        ("steps with a rebalance in flight", summary["steps_in_rebalance"]),
        ("added ms/step, steady p50", summary["added_ms_steady_p50"]),
        ("added ms/step, steady p99", summary["added_ms_steady_p99"]),
        ("added ms/step, rebalancing p50", summary["added_ms_rebalance_p50"]),
        ("added ms/step, rebalancing p99", summary["added_ms_rebalance_p99"]),
        ("added ms/step, max", summary["added_ms_max"]),
        ("whole step ms, p50", summary["step_ms_p50"]),
    ]
    memory = [
        ("peak memory, largest rank (RSS)", _gb(summary.get("peak_rss_max_rank"))),
        ("peak memory, whole run (PSS)", _gb(summary.get("peak_in_use_all"))),
    ]
    rows += [(name, value) for name, value in memory if value != "n/a"]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {_fmt(value)}" for name, value in rows]
    lines.append(_verification_line(summary))
    return "\n".join(lines)


def _verification_line(summary: dict[str, Any]) -> str:
    checked, matched = summary["outputs_checked"], summary["outputs_matched"]
    partial = summary.get("partial")
    if partial is not None and not checked:
        pairs = partial["layer_outputs_checked"]
        if not pairs:
            return "verification: not reached (the run stopped before it)"
        wrong = pairs - partial["layer_outputs_matched"]
        verdict = "all matched" if not wrong else f"{wrong} MISMATCHED"
        return (
            f"verification so far: {pairs} (step, layer) MoE outputs checked "
            f"against the unmoved reference, {verdict}; the run stopped before "
            f"every layer was checked"
        )
    verdict = "OK" if checked and checked == matched else "MISMATCH"
    return (
        f"verification: {matched}/{checked} steps' MoE outputs matched the unmoved "
        f"reference bit for bit: {verdict}"
    )


def _gb(value: Any) -> str:
    return f"{value / 1e9:.2f} GB" if isinstance(value, (int, float)) else "n/a"


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")


def write_json(
    path: Path,
    result: SimulationResult,
    summary: dict[str, Any],
    compare: dict[str, Any] | None = None,
) -> None:
    """The report: config, summary and every per-step series (and, with
    ``--compare``, the side-by-side columns and the baseline run's result)."""
    payload = {"summary": summary, **asdict(result)}
    if compare is not None:
        payload["compare"] = compare
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is not JSON: figures with no data (no rebalance happened) become null.
    path.write_text(json.dumps(_nan_to_none(payload), indent=1) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def write_plot(path: Path, result: SimulationResult) -> bool:
    """Balancedness and step time over the steps, commits marked.

    Returns False, writing nothing, when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = range(len(result.balancedness))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    for series, color, label in (
        (result.balancedness_unmoved, "0.5", "placement never moved"),
        (result.balancedness, "tab:blue", f"EPLB ({result.config.get('mode')})"),
    ):
        top.plot(steps, series, color=color, alpha=0.3, linewidth=0.7)
        top.plot(steps, rolling_mean(series, 8), color=color, label=label)
    top.set_ylabel("balancedness (mean/max)\nper step, 8-step mean")
    top.set_ylim(0, 1.02)
    bottom.plot(
        steps, [1e3 * t for t in result.step_seconds], color="0.6", label="whole step"
    )
    bottom.plot(
        steps,
        [1e3 * t for t in result.eplb_seconds],
        color="tab:red",
        label="EplbState.step()",
    )
    bottom.set_ylabel("ms per step (slowest rank)")
    bottom.set_xlabel("step")
    commits = [s for s, n in zip(steps, result.committed_layers, strict=True) if n]
    for axis in (top, bottom):
        _shade_rebalances(axis, result.in_rebalance)
        for step in commits:
            axis.axvline(step, color="tab:green", alpha=0.25, linewidth=0.8)
        axis.legend(loc="lower right", fontsize="small")
    top.set_title(_title(result.config), fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _shade_rebalances(axis: Any, in_rebalance: list[bool]) -> None:
    start = None
    for step, busy in enumerate([*in_rebalance, False]):
        if busy and start is None:
            start = step
        elif not busy and start is not None:
            axis.axvspan(start, step, color="tab:orange", alpha=0.15, linewidth=0)
            start = None


def _title(config: dict[str, Any]) -> str:
    keys = ("preset", "layers", "ranks", "redundant", "mode", "policy", "transport")
    return ", ".join(f"{k}={config[k]}" for k in keys if k in config)
