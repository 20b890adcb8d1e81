"""Fleet mode: what EPLB buys at an operator's scale, by simulation.

No weights move and no process starts. A load trace ``[windows, layers,
experts]`` is replayed through the real placement policies (ours through
``rebalance_algo.rebalance_experts``, vLLM's through
``DefaultEplbPolicy.rebalance_experts`` when vLLM is importable) and each
rebalance through the real transfer planner (``planner.plan_layers_moves``:
the decisions ``plan_layers`` builds its per-rank objects from, counted here
without building them); only the arithmetic around them lives here:

- load: trace window ``w`` stands for ``steps_per_window`` decode steps, each
  carrying ``trace[w] / steps_per_window``; a rebalance at step ``t`` sees the
  load of steps ``[t - window, t)``; rebalances come every ``interval`` steps,
  the first after a quarter interval (as vLLM's ``EplbState``);
- step time: a MoE layer lasts as long as its most-loaded rank needs, so the
  MoE time of a step is the sum over layers of the largest rank load (an
  expert's tokens split evenly over its replicas); throughput relative to no
  EPLB is that sum without EPLB over that sum with it. "No EPLB" is vLLM's
  static linear expert map (``E // ranks`` experts a rank, the first
  ``E % ranks`` ranks one more, no redundant slots);
- traffic: from each layer's plan, the experts every rank receives and sends,
  split intra-node / cross-node by the source rank's node, plus local copies;
- staging time: layers are staged one after another and a layer is done when
  its slowest rank is, a rank needing ``copies / copy rate + max(intra sent,
  intra received) / intra rate + max(cross sent, cross received) / cross
  rate``;
- modes: vLLM's policy runs as vLLM's sync mode (the engine stalls for the
  policy and all the staging, then serves the new placement); ours run as
  async (no stall; the new placement serves from the step its staging ends,
  ``ceil(stage time / step time)`` steps later; its layers in fact commit one
  by one before that, so this is slightly pessimistic) and skip a rebalance
  whose predicted balancedness gain is below ``min_gain``, as our
  ``EplbState`` does.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.load_stats import predicted_balancedness
from vllm.distributed.async_eplb.planner import LayerMoves, plan_layers_moves
from vllm.distributed.async_eplb.rebalance_algo import POLICIES, rebalance_experts
from vllm.distributed.async_eplb.simulation.presets import ModelPreset

__all__ = [
    "COPY_GBPS",
    "CROSS_NODE_GBPS",
    "INTRA_NODE_GBPS",
    "VLLM_POLICY",
    "FleetRun",
    "FleetSetting",
    "Geometry",
    "Links",
    "PlanCache",
    "balancedness",
    "cumulative_load",
    "geometry_from_config",
    "no_eplb_moe_time",
    "observed_load",
    "placement_rank_load",
    "rebalance_steps",
    "replay",
    "stage_seconds",
    "static_rank_load",
    "sweep_settings",
    "synthetic_trace",
    "traffic_of_moves",
    "vllm_available",
]

# Link rates (GB/s, 1e9 bytes), defaults measured on H200s (RESULTS.md and
# /work/shared/notes/h200-transfers.md, 2026-11-30):
COPY_GBPS = 396.4e6 / 0.192e-3 / 1e9
"""Device-to-device copy on one H200: a 396.4 MB layer in 0.192 ms (the copy
floor, RESULTS.md "One GPU (issue 7)" and issue 13), ~2065 GB/s."""
INTRA_NODE_GBPS = 346.0
"""One NCCL send between two H200s over NVLink: 346-352 GB/s for 396 MB
(h200-transfers.md); the lower end."""
CROSS_NODE_GBPS = 3.3
"""Measured host path, not a NIC: device -> pinned host -> gloo -> pinned host
-> device between two H200s of one machine, 2.8-3.3 GB/s (RESULTS.md issue 13,
section 4); what our ``auto`` transport takes between nodes today. NCCL over a
400 Gb/s adapter would give ~45 GB/s (assumed, not measured):
``--cross-node-gbps 45``."""

VLLM_POLICY = "vllm"
"""Name of vLLM's own policy (``DefaultEplbPolicy``, sync mode) in this module."""

# Plan traffic rows (expert counts per rank).
RECV_INTRA, RECV_CROSS, SENT_INTRA, SENT_CROSS, COPIES = range(5)


@dataclass(frozen=True)
class Geometry:
    """The MoE geometry EPLB sees; ``expert_bytes`` is one expert's weights."""

    name: str
    num_layers: int
    num_experts: int
    num_groups: int
    top_k: int
    expert_bytes: int

    @classmethod
    def from_preset(cls, preset: ModelPreset, bytes_per_element: int) -> Geometry:
        if bytes_per_element <= 0:
            raise ValueError(f"bytes per element must be > 0, got {bytes_per_element}")
        return cls(
            preset.name,
            preset.num_moe_layers,
            preset.num_routed_experts,
            preset.num_expert_groups,
            preset.top_k,
            preset.expert_params * bytes_per_element,
        )


def geometry_from_config(path: str | Path, bytes_per_element: int) -> Geometry:
    """Geometry from a Hugging Face ``config.json`` of a MoE model.

    Reads routed experts (``n_routed_experts``, ``num_experts`` or
    ``num_local_experts``), MoE layers (``num_hidden_layers`` less
    ``first_k_dense_replace``), ``n_group`` (1 when absent), top-k
    (``num_experts_per_tok``) and one expert's size (3 x ``hidden_size`` x
    ``moe_intermediate_size``, or ``intermediate_size`` when there is none).
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"model config {path} is not a JSON object")

    def first(*keys: str, default: int | None = None) -> int:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        if default is None:
            raise ValueError(
                f"model config {path} has no positive integer {' / '.join(keys)}"
            )
        return default

    experts = first("n_routed_experts", "num_experts", "num_local_experts")
    layers = first("num_hidden_layers") - int(config.get("first_k_dense_replace", 0))
    if layers <= 0:
        raise ValueError(f"model config {path} leaves {layers} MoE layers")
    hidden = first("hidden_size")
    inner = first("moe_intermediate_size", "intermediate_size")
    if bytes_per_element <= 0:
        raise ValueError(f"bytes per element must be > 0, got {bytes_per_element}")
    return Geometry(
        str(config.get("model_type", path.stem)),
        layers,
        experts,
        first("n_group", default=1),
        first("num_experts_per_tok"),
        3 * hidden * inner * bytes_per_element,
    )


@dataclass(frozen=True)
class Links:
    """Link rates in GB/s (1e9 bytes per second)."""

    copy_gbps: float = COPY_GBPS
    intra_node_gbps: float = INTRA_NODE_GBPS
    cross_node_gbps: float = CROSS_NODE_GBPS

    def __post_init__(self) -> None:
        for name in ("copy_gbps", "intra_node_gbps", "cross_node_gbps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be finite and > 0, got {value}")


@dataclass(frozen=True)
class FleetSetting:
    """One deployment and EPLB setting of a sweep (steps are decode steps)."""

    gpus: int
    redundant: int
    interval: int
    window: int
    gpus_per_node: int = 8

    def check(self, geometry: Geometry) -> None:
        """ValueError naming the value that makes this setting impossible."""
        for name in ("gpus", "interval", "window", "gpus_per_node"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.redundant < 0:
            raise ValueError(f"redundant must be >= 0, got {self.redundant}")
        slots = geometry.num_experts + self.redundant
        if slots % self.gpus:
            raise ValueError(
                f"{slots} physical slots ({geometry.num_experts} experts + "
                f"{self.redundant} redundant) are not divisible by {self.gpus} GPUs"
            )
        if self.gpus % self.gpus_per_node:
            raise ValueError(
                f"{self.gpus} GPUs are not a whole number of nodes of "
                f"{self.gpus_per_node}"
            )

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node


def vllm_available() -> bool:
    """True when vLLM's own EPLB policy package is installed.

    Found, not imported: importing it takes seconds (``vllm.config``), so the
    import happens at the first use, in the process that runs the policy."""
    try:
        return importlib.util.find_spec("vllm.distributed.eplb.policy") is not None
    except ImportError:  # no vllm.distributed.eplb (vLLM is not installed)
        return False


def synthetic_trace(
    windows: int, layers: int, experts: int, *, seed: int, drift_period: int = 250
) -> np.ndarray:
    """Drifting skewed load ``[windows, layers, experts]`` (token counts).

    Log-normal popularity whose hot experts turn between two random patterns,
    one full turn every ``drift_period`` windows (the simulator's synthetic
    load, per window instead of per step).
    """
    if windows <= 0 or drift_period <= 0:
        raise ValueError(
            f"windows and drift period must be > 0, got {windows}, {drift_period}"
        )
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((2, layers, experts))
    angle = 2.0 * np.pi * np.arange(windows) / drift_period
    logits = 0.8 * (
        np.cos(angle)[:, None, None] * patterns[0]
        + np.sin(angle)[:, None, None] * patterns[1]
    )
    weights = np.exp(logits)
    return 1024.0 * weights / weights.sum(axis=-1, keepdims=True)


def static_rank_load(load: np.ndarray, num_ranks: int) -> np.ndarray:
    """Rank load ``[..., num_ranks]`` under vLLM's static linear expert map
    (no EPLB): rank r holds experts ``[r*b + min(r, m), ...)`` of ``b + (r < m)``
    experts, ``b, m = divmod(E, ranks)``; ranks past ``E`` hold none."""
    experts = load.shape[-1]
    base, extra = divmod(experts, num_ranks)
    counts = np.full(num_ranks, base)
    counts[:extra] += 1
    starts = np.cumsum(counts) - counts
    held = counts > 0
    out = np.zeros((*load.shape[:-1], num_ranks))
    out[..., held] = np.add.reduceat(load, starts[held], axis=-1)
    return out


def placement_rank_load(
    load: np.ndarray, phy2log: np.ndarray, num_ranks: int
) -> np.ndarray:
    """Rank load ``[..., L, num_ranks]`` of ``load [..., L, E]`` served by
    ``phy2log [L, P]``: an expert's tokens split evenly over its replicas."""
    layers, experts = phy2log.shape[0], load.shape[-1]
    counts = np.zeros((layers, experts))
    np.add.at(counts, (np.arange(layers)[:, None], phy2log), 1.0)
    share = load / np.maximum(counts, 1.0)
    # One gather over the flattened (layer, expert) axis: each slot's share.
    flat = (np.arange(layers)[:, None] * experts + phy2log).ravel()
    per_slot = np.take(share.reshape(*share.shape[:-2], -1), flat, axis=-1)
    return per_slot.reshape(*share.shape[:-2], layers, num_ranks, -1).sum(axis=-1)


def balancedness(rank_load: np.ndarray) -> np.ndarray:
    """vLLM's balancedness of ``[..., L, R]``: layer means summed over layer
    maxima summed (0 without load)."""
    mean = rank_load.mean(axis=-1).sum(axis=-1)
    peak = rank_load.max(axis=-1).sum(axis=-1)
    return np.divide(mean, peak, out=np.zeros_like(mean), where=peak > 0)


def cumulative_load(trace: np.ndarray) -> np.ndarray:
    """``[W + 1, L, E]`` float64: entry w sums the trace's windows before w."""
    out = np.empty((trace.shape[0] + 1, *trace.shape[1:]))
    out[0] = 0.0
    np.cumsum(trace, axis=0, out=out[1:])
    return out


def observed_load(
    cumulative: np.ndarray, trace: np.ndarray, steps_per_window: int, step: int
) -> np.ndarray:
    """Load of steps ``[0, step)``: ``cumulative[w]`` sums windows before w,
    and each step of window w carries ``trace[w] / steps_per_window``."""
    window, within = divmod(step, steps_per_window)
    if window >= trace.shape[0]:
        return cumulative[-1]
    return cumulative[window] + trace[window] * (within / steps_per_window)


def traffic_of_moves(moves: LayerMoves, ranks_per_node: int) -> np.ndarray:
    """Experts per rank ``[5, R]``: received and sent intra-node and
    cross-node (by the source's node), and slots filled by a local copy
    (a local source, or the extra slots of a duplicate receive)."""
    ranks = moves.num_ranks
    moved = moves.is_transfer
    dst, src = moves.rank[moved], moves.src_rank[moved]
    cross = src // ranks_per_node != dst // ranks_per_node
    out = np.zeros((5, ranks), dtype=np.int64)
    out[RECV_INTRA] = np.bincount(dst[~cross], minlength=ranks)
    out[RECV_CROSS] = np.bincount(dst[cross], minlength=ranks)
    out[SENT_INTRA] = np.bincount(src[~cross], minlength=ranks)
    out[SENT_CROSS] = np.bincount(src[cross], minlength=ranks)
    out[COPIES] = moves.changed.sum(axis=1) - np.bincount(dst, minlength=ranks)
    return out


def stage_seconds(traffic: np.ndarray, expert_bytes: int, links: Links) -> float:
    """Time to stage layers ``[L, 5, R]`` one after another at ``links``: a
    layer takes its slowest rank's copies, intra-node and cross-node time."""
    if traffic.size == 0:
        return 0.0
    per_rank = (
        expert_bytes
        / 1e9
        * (
            traffic[:, COPIES] / links.copy_gbps
            + np.maximum(traffic[:, SENT_INTRA], traffic[:, RECV_INTRA])
            / links.intra_node_gbps
            + np.maximum(traffic[:, SENT_CROSS], traffic[:, RECV_CROSS])
            / links.cross_node_gbps
        )
    )
    return float(per_rank.max(axis=-1).sum())


class PlanCache:
    """Traffic of layer moves, planned by ``plan_layers_moves`` once per distinct
    (old row, new row): policies that agree (vLLM's and our ``default``) and
    repeated moves share one plan; unchanged layers are not planned."""

    def __init__(self, num_ranks: int, ranks_per_node: int) -> None:
        self.num_ranks = num_ranks
        self.ranks_per_node = ranks_per_node
        self._traffic: dict[bytes, np.ndarray] = {}
        self.planned_layers = 0

    def traffic(self, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        """``[L', 5, R]`` for the layers of ``old``/``new [L, P]`` that change."""
        changed = np.flatnonzero((old != new).any(axis=1))
        keys = [old[i].tobytes() + new[i].tobytes() for i in changed]
        todo = [
            i for i, key in zip(changed, keys, strict=True) if key not in self._traffic
        ]
        if todo:
            moves = plan_layers_moves(
                torch.from_numpy(old[todo]),
                torch.from_numpy(new[todo]),
                self.num_ranks,
                self.ranks_per_node,
            )
            self.planned_layers += len(todo)
            for i, layer_moves in zip(todo, moves, strict=True):
                key = old[i].tobytes() + new[i].tobytes()
                self._traffic[key] = traffic_of_moves(layer_moves, self.ranks_per_node)
        if not keys:
            return np.zeros((0, 5, self.num_ranks), dtype=np.int64)
        return np.stack([self._traffic[key] for key in keys])


@dataclass
class Rebalance:
    """One rebalance decision of a run."""

    step: int
    skipped: bool
    policy_seconds: float
    traffic: np.ndarray  # [5, R] experts, summed over the layers that changed
    layers_moved: int
    stage_seconds: float
    applied_step: int


@dataclass
class FleetRun:
    """One policy at one setting over the whole trace."""

    policy: str
    mode: str
    setting: FleetSetting
    balancedness: np.ndarray  # [windows]
    moe_time: float  # sum over steps and layers of the busiest rank's tokens
    moe_time_no_eplb: float
    rebalances: list[Rebalance] = field(default_factory=list)

    @property
    def relative_throughput(self) -> float:
        return self.moe_time_no_eplb / self.moe_time if self.moe_time else 0.0

    @property
    def done(self) -> list[Rebalance]:
        return [r for r in self.rebalances if not r.skipped]


def _policy_function(policy: str) -> Callable[..., torch.Tensor]:
    if policy == VLLM_POLICY:
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

        return DefaultEplbPolicy.rebalance_experts
    if policy not in POLICIES:
        known = ", ".join([VLLM_POLICY, *POLICIES])
        raise ValueError(f"unknown policy {policy!r}; known: {known}")

    def ours(*args: object) -> torch.Tensor:
        return rebalance_experts(*args, policy=policy)

    return ours


def rebalance_steps(total_steps: int, interval: int) -> list[int]:
    """Steps at which a rebalance is decided: vLLM's first comes after a
    quarter interval, then one every ``interval``."""
    return list(range(max(1, interval // 4), total_steps, interval))


def replay(
    trace: np.ndarray,
    geometry: Geometry,
    setting: FleetSetting,
    policy: str,
    *,
    links: Links,
    steps_per_window: int,
    step_seconds: float,
    cache: PlanCache,
    min_gain: float = AsyncEplbConfig.min_gain,
    on_rebalance: Callable[[], None] | None = None,
    moe_time_no_eplb: float | None = None,
    cumulative: np.ndarray | None = None,
) -> FleetRun:
    """Replay ``trace [W, L, E]`` (tokens per window) under one policy.

    ``moe_time_no_eplb`` (``no_eplb_moe_time`` of this trace and fleet size)
    and ``cumulative`` (``cumulative_load`` of the trace): when the caller
    already has them (the same for every run of a sweep)."""
    setting.check(geometry)
    windows, layers, experts = trace.shape
    if (layers, experts) != (geometry.num_layers, geometry.num_experts):
        raise ValueError(
            f"trace is {layers} layers x {experts} experts, geometry "
            f"{geometry.num_layers} x {geometry.num_experts}"
        )
    if steps_per_window <= 0 or not step_seconds > 0:
        raise ValueError(
            f"steps per window and step time must be > 0, got {steps_per_window}, "
            f"{step_seconds}"
        )
    rebalance_fn = _policy_function(policy)
    sync = policy == VLLM_POLICY
    ranks, slots = setting.gpus, geometry.num_experts + setting.redundant
    total_steps = windows * steps_per_window
    if cumulative is None:
        cumulative = cumulative_load(trace)

    # Placement changes: (first step it serves, phy2log), vLLM's initial map.
    placement = np.tile(np.arange(slots) % experts, (layers, 1)).astype(np.int64)
    changes: list[tuple[int, np.ndarray]] = [(0, placement)]
    run = FleetRun(
        policy,
        "sync" if sync else "async",
        setting,
        np.zeros(windows),
        0.0,
        0.0,
    )
    for step in rebalance_steps(total_steps, setting.interval):
        load = observed_load(cumulative, trace, steps_per_window, step) - (
            observed_load(
                cumulative, trace, steps_per_window, max(0, step - setting.window)
            )
        )
        if on_rebalance is not None:
            on_rebalance()
        old = changes[-1][1]
        started = time.perf_counter()
        new = rebalance_fn(
            torch.from_numpy(load).float(),
            slots,
            geometry.num_groups,
            setting.nodes,
            ranks,
            torch.from_numpy(old),
        )
        policy_s = time.perf_counter() - started
        new = np.asarray(new, dtype=np.int64).reshape(layers, slots)
        skipped = not sync and (
            predicted_balancedness(torch.from_numpy(load), torch.from_numpy(new), ranks)
            - predicted_balancedness(
                torch.from_numpy(load), torch.from_numpy(old), ranks
            )
            < min_gain
        )
        traffic = (
            np.zeros((0, 5, ranks), dtype=np.int64)
            if skipped
            else cache.traffic(old, new)
        )
        stage_s = stage_seconds(traffic, geometry.expert_bytes, links)
        applied = step if sync else step + math.ceil(stage_s / step_seconds)
        run.rebalances.append(
            Rebalance(
                step,
                skipped,
                policy_s,
                traffic.sum(axis=0)
                if len(traffic)
                else np.zeros((5, ranks), dtype=np.int64),
                len(traffic),
                stage_s,
                applied,
            )
        )
        if not skipped and len(traffic):
            changes.append((applied, new))

    run.moe_time_no_eplb = (
        no_eplb_moe_time(trace, steps_per_window, ranks)
        if moe_time_no_eplb is None
        else moe_time_no_eplb
    )
    _score(run, trace, changes, steps_per_window, ranks)
    return run


def no_eplb_moe_time(trace: np.ndarray, steps_per_window: int, ranks: int) -> float:
    """MoE time of ``trace`` under vLLM's static map: the sum over steps and
    layers of the busiest rank's tokens."""
    per_step = trace / steps_per_window
    return float(static_rank_load(per_step, ranks).max(-1).sum() * steps_per_window)


def _score(
    run: FleetRun,
    trace: np.ndarray,
    changes: Sequence[tuple[int, np.ndarray]],
    steps_per_window: int,
    ranks: int,
) -> None:
    """MoE time and balancedness per window of the placements over time."""
    windows = trace.shape[0]
    per_step = trace / steps_per_window
    peak = np.zeros(windows)  # busiest-rank tokens summed over layers, per window
    mean = np.zeros(windows)
    bounds = [start for start, _ in changes] + [windows * steps_per_window]
    for (start, phy2log), end in zip(changes, bounds[1:], strict=True):
        if end <= start:
            continue
        first, last = start // steps_per_window, (end - 1) // steps_per_window
        rank_load = placement_rank_load(per_step[first : last + 1], phy2log, ranks)
        steps = np.full(last - first + 1, steps_per_window)
        steps[0] -= start - first * steps_per_window
        steps[-1] -= (last + 1) * steps_per_window - end
        peak[first : last + 1] += steps * rank_load.max(-1).sum(-1)
        mean[first : last + 1] += steps * rank_load.mean(-1).sum(-1)
    run.moe_time = float(peak.sum())
    run.balancedness = np.divide(mean, peak, out=np.zeros_like(mean), where=peak > 0)


def sweep_settings(
    gpus: Iterable[int],
    redundant: Iterable[int],
    interval: Iterable[int],
    window: Iterable[int],
    gpus_per_node: int,
    geometry: Geometry,
) -> tuple[list[FleetSetting], list[str]]:
    """Every combination; those the geometry cannot hold are left out, each
    with a note saying why."""
    settings, notes = [], []
    for g in gpus:
        for r in redundant:
            for i in interval:
                for w in window:
                    setting = FleetSetting(g, r, i, w, gpus_per_node)
                    try:
                        setting.check(geometry)
                    except ValueError as exc:
                        note = f"skipped gpus={g} redundant={r}: {exc}"
                        if note not in notes:
                            notes.append(note)
                        continue
                    settings.append(setting)
    return settings, notes
