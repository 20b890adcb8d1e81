"""What each rank has done so far, kept where the launcher can read it.

Every rank keeps a record (a plain dict: its step series, EplbState's counters,
its share of the verification, its memory) and rewrites it to a file at most
once a second and at every change of phase. When the run ends, rank 0 gathers
the records over the process group; when a rank dies, the launcher reads the
files instead, and :func:`combine_ranks` makes the same result out of either,
cut to the steps every rank had finished.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

from vllm.distributed.async_eplb.simulation.report import SimulationResult

__all__ = ["RankRecord", "combine_ranks", "read_records"]

_PREFIX = "rank-"
RANK0_SERIES = (
    "balancedness",
    "balancedness_unmoved",
    "in_rebalance",
    "committed_layers",
    "experts_received",
    "bytes_received",
    "blocking_collectives",
)
"""Series only rank 0 measures (the routing is global, so one rank suffices)."""


class RankRecord:
    """One rank's record, saved to ``directory/rank-<r>.pkl`` now and then.

    Writes go to a temporary file renamed over the old one, so a reader never
    sees half a record, even when the rank is killed while writing.
    """

    def __init__(
        self, rank: int, directory: str | Path | None, interval_s: float = 1.0
    ) -> None:
        self.data: dict[str, Any] = {
            "rank": rank,
            "phase": "starting",
            "steps_done": 0,
            "step_seconds": [],
            "eplb_seconds": [],
            **({name: [] for name in RANK0_SERIES} if rank == 0 else {}),
        }
        self._path = (
            None if directory is None else Path(directory) / f"{_PREFIX}{rank}.pkl"
        )
        self._interval_s = interval_s
        self._last_write = -float("inf")

    def save(self, *, force: bool = False) -> None:
        """Write the record if a second has passed since the last (or ``force``)."""
        now = time.monotonic()
        if self._path is None or (
            not force and now - self._last_write < self._interval_s
        ):
            return
        self._last_write = now
        temporary = self._path.with_suffix(f".tmp{os.getpid()}")
        with open(temporary, "wb") as file:
            pickle.dump(self.data, file)
        os.replace(temporary, self._path)


def read_records(directory: str | Path) -> dict[int, dict[str, Any]]:
    """The last saved record of every rank that saved one."""
    records = {}
    for path in Path(directory).glob(f"{_PREFIX}*.pkl"):
        try:
            with open(path, "rb") as file:
                record = pickle.load(file)
        except (OSError, EOFError, pickle.UnpicklingError):
            continue
        records[record["rank"]] = record
    return records


def combine_ranks(
    config: dict[str, Any], records: dict[int, dict[str, Any]], ranks: int
) -> SimulationResult:
    """One result from the ranks' records: the slowest rank's time per step,
    bytes summed, counters from rank 0.

    Missing ranks or unfinished steps make a partial result, cut to the steps
    that every recorded rank finished; its ``partial`` says how far each got.
    The verification counts steps only when every layer of the step was
    checked (each rank checks its own layers on every step); a partial
    result also counts the (step, layer) outputs checked so far.
    """
    # Only rank 0 measures balancedness: without its record, no step shows.
    steps = min((r["steps_done"] for r in records.values()), default=0)
    steps = steps if 0 in records else 0
    rank0 = records.get(0, {})
    series = {name: list(rank0.get(name, []))[:steps] for name in RANK0_SERIES}

    def slowest(key: str) -> list[float]:
        per_rank = [r[key][:steps] for r in records.values()]
        return (
            [max(values) for values in zip(*per_rank, strict=True)] if per_rank else []
        )

    verify = [r.get("verify") for r in records.values()]
    complete = len(records) == ranks and all(
        v is not None and v["layers_done"] == len(v["layers"]) for v in verify
    )
    checked = matched = 0
    if complete:
        checked = steps
        matched = sum(
            all(step) for step in zip(*(v["step_ok"] for v in verify), strict=True)
        )
    counters = {
        name: rank0[name] for name in ("rebalances", "skips", "aborts") if name in rank0
    }
    counters.update(
        bytes_moved=sum(r.get("bytes_moved", 0) for r in records.values()),
        staging_seconds_max_rank=max(
            (r.get("staging_seconds", 0.0) for r in records.values()), default=0.0
        ),
        commit_seconds_max_rank=max(
            (r.get("commit_seconds", 0.0) for r in records.values()), default=0.0
        ),
    )
    peaks = {rank: r.get("peak_rss", 0) for rank, r in sorted(records.items())}
    finished = complete and all(r["phase"] == "done" for r in records.values())
    partial = None
    if not finished:
        partial = {
            "steps_completed": steps,
            "ranks": {
                rank: {"phase": r["phase"], "steps_done": r["steps_done"]}
                for rank, r in sorted(records.items())
            },
            "ranks_without_record": sorted(set(range(ranks)) - set(records)),
            "layer_outputs_checked": sum(v["pairs_checked"] for v in verify if v),
            "layer_outputs_matched": sum(v["pairs_matched"] for v in verify if v),
        }
    return SimulationResult(
        config=config,
        balancedness=series["balancedness"],
        balancedness_unmoved=series["balancedness_unmoved"],
        step_seconds=slowest("step_seconds"),
        eplb_seconds=slowest("eplb_seconds"),
        in_rebalance=series["in_rebalance"],
        committed_layers=series["committed_layers"],
        outputs_checked=checked,
        outputs_matched=matched,
        counters=counters,
        memory={"peak_rss_per_rank": peaks},
        partial=partial,
        experts_received=series["experts_received"],
        bytes_received=series["bytes_received"],
        blocking_collectives=series["blocking_collectives"],
    )
