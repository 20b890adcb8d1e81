"""A fleet sweep's runs, spread over worker processes.

Every (setting, policy) run of a sweep is independent of the others, so they
run in ``jobs`` processes, one core each. The runs are grouped into units:
one setting and the policies that often place alike (vLLM's and our
``default``, the two ``balanced`` policies), so that a unit's runs share
their plans. Workers keep their plans (per fleet size) and the no-EPLB time
across units. The parent hands out units as workers free up, the longest
first, keeps vLLM's policy (seconds to import) on worker 0 as long as
others have work of their own, and drives the progress bar from the workers'
ticks. Results come back in the sweep's order, whatever the order the units
finished in, and are the same as with one process: the processes share no
state that a result depends on.

Processes are forked where the platform can (they inherit the imports, the
trace and numba's compiled kernels), spawned elsewhere (the worker's entry
point and its inputs are picklable).
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import numpy as np
import torch

from vllm.distributed.async_eplb.rebalance_algo import warm_up
from vllm.distributed.async_eplb.simulation.fleet import (
    VLLM_POLICY,
    FleetRun,
    FleetSetting,
    Geometry,
    Links,
    PlanCache,
    cumulative_load,
    no_eplb_moe_time,
    rebalance_steps,
    replay,
)

__all__ = [
    "SHARED_PLANS",
    "SweepInputs",
    "Unit",
    "UnitRunner",
    "default_jobs",
    "make_units",
    "run_sweep",
]

SHARED_PLANS = (
    frozenset({VLLM_POLICY, "default"}),
    frozenset({"balanced", "balanced_spill"}),
)
"""Policies that often give the same placements (``default`` is vLLM's
placement; the ``balanced`` pair differs only with 3+ slots a GPU): one unit,
one plan cache."""


@dataclass(frozen=True)
class SweepInputs:
    """What every run of a sweep reads (sent to each worker once)."""

    trace: np.ndarray
    geometry: Geometry
    links: Links
    steps_per_window: int
    step_seconds: float
    min_gain: float


@dataclass(frozen=True)
class Unit:
    """One setting and the policies run on it in one process."""

    setting: FleetSetting
    policies: tuple[str, ...]


def default_jobs() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def make_units(settings: Sequence[FleetSetting], policies: Sequence[str]) -> list[Unit]:
    """Per setting, the policies grouped by ``SHARED_PLANS`` (order kept)."""
    units = []
    for setting in settings:
        groups: list[list[str]] = []
        for policy in policies:
            group = next((g for g in groups if _share_plans(g[0], policy)), None)
            if group is None:
                groups.append([policy])
            else:
                group.append(policy)
        units += [Unit(setting, tuple(group)) for group in groups]
    return units


def _share_plans(a: str, b: str) -> bool:
    return any(a in group and b in group for group in SHARED_PLANS)


class UnitRunner:
    """Runs units in this process; plans and no-EPLB times kept across units."""

    def __init__(self, inputs: SweepInputs) -> None:
        self.inputs = inputs
        self._caches: dict[tuple[int, int], PlanCache] = {}
        self._no_eplb: dict[int, float] = {}
        self._warm: set[str] = set()
        self._cumulative = cumulative_load(inputs.trace)

    def run(
        self, unit: Unit, on_rebalance: Callable[[], None] | None
    ) -> list[FleetRun]:
        """The unit's runs, in the order of its policies."""
        inputs, setting = self.inputs, unit.setting
        key = (setting.gpus, setting.gpus_per_node)
        cache = self._caches.setdefault(key, PlanCache(*key))
        if setting.gpus not in self._no_eplb:
            self._no_eplb[setting.gpus] = no_eplb_moe_time(
                inputs.trace, inputs.steps_per_window, setting.gpus
            )
        runs = []
        for policy in unit.policies:
            if policy != VLLM_POLICY and policy not in self._warm:
                warm_up(policy)  # numba's kernels, before any policy is timed
                self._warm.add(policy)
            runs.append(
                replay(
                    inputs.trace,
                    inputs.geometry,
                    setting,
                    policy,
                    links=inputs.links,
                    steps_per_window=inputs.steps_per_window,
                    step_seconds=inputs.step_seconds,
                    cache=cache,
                    min_gain=inputs.min_gain,
                    on_rebalance=on_rebalance,
                    moe_time_no_eplb=self._no_eplb[setting.gpus],
                    cumulative=self._cumulative,
                )
            )
        return runs


def _worker(conn: Connection, inputs: SweepInputs) -> None:
    """Run the units the parent sends until it sends None."""
    torch.set_num_threads(1)  # one core a process: no threads spinning on the other
    runner = UnitRunner(inputs)
    tick = ("tick",)
    while (message := conn.recv()) is not None:
        index, unit = message
        try:
            runs = runner.run(unit, lambda: conn.send(tick))
        except BaseException:
            conn.send(("error", index, traceback.format_exc()))
            return
        conn.send(("done", index, runs))


def _cost(unit: Unit, total_steps: int) -> int:
    return len(unit.policies) * len(rebalance_steps(total_steps, unit.setting.interval))


def run_sweep(
    units: Sequence[Unit],
    inputs: SweepInputs,
    jobs: int,
    on_rebalance: Callable[[], None] | None = None,
    while_waiting: Callable[[], object] | None = None,
) -> list[FleetRun]:
    """Every unit's runs, in the order of ``units`` and their policies.

    ``jobs`` worker processes (1: this process, no worker); ``while_waiting``
    runs in this process once the workers have their first units (work the
    parent can overlap with theirs). RuntimeError with the worker's traceback
    when a unit fails, or when a worker dies."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    jobs = min(jobs, len(units))
    if jobs <= 1:
        if while_waiting is not None:
            while_waiting()
        runner = UnitRunner(inputs)
        return [run for unit in units for run in runner.run(unit, on_rebalance)]

    total_steps = inputs.trace.shape[0] * inputs.steps_per_window
    order = sorted(range(len(units)), key=lambda i: -_cost(units[i], total_steps))
    with_vllm = [i for i in order if VLLM_POLICY in units[i].policies]
    without = [i for i in order if VLLM_POLICY not in units[i].policies]

    def next_unit(worker: int) -> int | None:
        first, second = (with_vllm, without) if worker == 0 else (without, with_vllm)
        for queue in (first, second):
            if queue:
                return queue.pop(0)
        return None

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    results: list[list[FleetRun] | None] = [None] * len(units)
    connections: list[Connection] = []
    processes = []
    finished = False

    def start(worker: int) -> None:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_worker, args=(child_end, inputs), daemon=True)
        process.start()
        child_end.close()
        connections.append(parent_end)
        processes.append(process)
        parent_end.send((index := next_unit(worker), units[index]))

    try:
        # Worker 0 imports vLLM's policy while this process builds our
        # policies' numba kernels (or loads them from numba's disk cache,
        # seconds either way); the workers forked after it inherit them,
        # instead of each compiling the same kernels on a fresh install.
        first = 1 if with_vllm else 0
        for worker in range(first):
            start(worker)
        for policy in sorted({p for u in units for p in u.policies} - {VLLM_POLICY}):
            warm_up(policy)
        for worker in range(first, jobs):
            start(worker)
        if while_waiting is not None:
            while_waiting()
        busy = set(range(jobs))
        while busy:
            for conn in wait([connections[w] for w in busy]):
                worker = connections.index(conn)
                try:
                    message = conn.recv()
                except EOFError:
                    raise RuntimeError(
                        f"fleet worker {worker} died (exit code "
                        f"{processes[worker].exitcode})"
                    ) from None
                if message[0] == "tick":
                    if on_rebalance is not None:
                        on_rebalance()
                    continue
                kind, index, payload = message
                if kind == "error":
                    unit = units[index]
                    raise RuntimeError(
                        f"fleet run failed at {unit.setting} {list(unit.policies)}:\n"
                        f"{payload}"
                    )
                results[index] = payload
                following = next_unit(worker)
                if following is None:
                    conn.send(None)
                    busy.discard(worker)
                else:
                    conn.send((following, units[following]))
        finished = True
    finally:
        for process in processes:
            process.join(timeout=10 if finished else 0)
            if process.is_alive():
                process.terminate()
                process.join()
        for conn in connections:
            conn.close()
    return [run for runs in results for run in runs]  # type: ignore[union-attr]
