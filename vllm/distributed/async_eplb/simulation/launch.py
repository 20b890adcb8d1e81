"""Start the ranks of a simulated run, watch their memory, and collect the result.

One process per rank (forked on CPU, spawned for CUDA). While they run, the
launcher samples their memory twice a second: the run's peak goes into the
report, and when a rank dies the memory in use just before says why. A rank
that dies still leaves a report: what every rank had saved of its progress.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from vllm.distributed.async_eplb.rebalance_algo import warm_up
from vllm.distributed.async_eplb.simulation.memory import describe_exit, process_memory
from vllm.distributed.async_eplb.simulation.progress import combine_ranks, read_records
from vllm.distributed.async_eplb.simulation.report import SimulationResult
from vllm.distributed.async_eplb.simulation.runner import SimConfig, run_rank

__all__ = ["RankFailed", "compile_policy", "compiled_line", "launch"]

_RESULT_FILE = "result.pkl"
_SAMPLE_S = 0.5


class RankFailed(RuntimeError):
    """A rank raised or died; ``partial`` is the run as far as it got."""

    def __init__(self, message: str, partial: SimulationResult) -> None:
        super().__init__(message)
        self.partial = partial


def _rank_main(
    rank: int, config: SimConfig, init_method: str, result_dir: str, progress: bool
) -> None:
    """Entry of one rank process: CPU threads shared fairly, result pickled."""
    if config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.ranks))
    logging.basicConfig(
        level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s"
    )
    result = run_rank(
        rank, config, init_method, show_progress=progress, record_dir=result_dir
    )
    if result is not None:
        with open(Path(result_dir) / _RESULT_FILE, "wb") as file:
            pickle.dump(result, file)


def _start_method(config: SimConfig) -> str:
    """fork on CPU: ranks inherit the parent's imports (vLLM's, when installed,
    take seconds per process); spawn for CUDA, which must not be forked."""
    if config.device == "cpu" and "fork" in mp.get_all_start_methods():
        return "fork"
    return "spawn"


class _MemoryWatch:
    """The ranks' memory, sampled: the last figures and the run's peak."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self.last_pss = dict.fromkeys(range(len(pids)), 0)
        self.last_in_use = 0
        self.peak_in_use = 0

    def sample(self) -> None:
        """Proportional set sizes summed (shared pages counted once), with the
        launcher's own. A sample missing a rank that is gone is not kept: the
        last figures are those from before it died."""
        in_use = process_memory().pss
        per_rank = [process_memory(pid).pss for pid in self._pids]
        if all(per_rank):
            self.last_pss = dict(enumerate(per_rank))
            self.last_in_use = in_use + sum(per_rank)
            self.peak_in_use = max(self.peak_in_use, self.last_in_use)


def compile_policy(config: SimConfig) -> float:
    """Compile our policy's numba kernels here, once, before the ranks start;
    returns the seconds it took (0 for vLLM's baseline, which uses none).

    Each rank's ``EplbState`` warms them up at start-up: on a fresh clone (no
    numba cache yet) the 4 ranks compiled the same kernels at once, 27 s of
    CPU each, 100 s before the first step on 2 cores. Forked ranks inherit
    the compiled kernels; spawned ones load the cache this writes.
    """
    if config.implementation != "ours":
        return 0.0
    started = time.perf_counter()
    warm_up(config.policy)
    return time.perf_counter() - started


def compiled_line(seconds: float) -> str:
    """Where the seconds before our run's first step go on a fresh clone."""
    return (
        f"policy kernels (numba) ready in {seconds:.1f} s: loaded from numba's "
        f"cache (scripts/setup_env.sh fills it), compiled when it is empty"
    )


def launch(config: SimConfig, progress: bool) -> SimulationResult:
    """Run the ranks; one that fails raises RankFailed with the partial result.

    Call :func:`compile_policy` first (the ranks would compile on their own).
    """
    with tempfile.TemporaryDirectory(prefix="eplb-sim-") as result_dir:
        # A file rendezvous: no port to pick, so parallel runs cannot clash.
        init_method = f"file://{Path(result_dir) / 'rendezvous'}"
        context = mp.start_processes(
            _rank_main,
            args=(config, init_method, result_dir, progress),
            nprocs=config.ranks,
            join=False,
            start_method=_start_method(config),
        )
        watch = _MemoryWatch(context.pids())
        try:
            watch.sample()
            while not context.join(timeout=_SAMPLE_S):
                watch.sample()
        except mp.ProcessRaisedException as exc:
            log = Path(config.out) / "error.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(str(exc))
            last = [line for line in str(exc).splitlines() if line.strip()][-1]
            message = f"rank {exc.error_index} failed: {last} (traceback in {log})"
            raise RankFailed(message, _partial(config, result_dir, watch)) from None
        except mp.ProcessExitedException as exc:
            rank = exc.error_index
            cause = describe_exit(
                exc.exit_code, watch.last_in_use, watch.last_pss.get(rank)
            )
            partial = _partial(config, result_dir, watch)
            message = f"rank {rank} {cause}"
            raise RankFailed(message, partial) from None
        with open(Path(result_dir) / _RESULT_FILE, "rb") as file:
            result: SimulationResult = pickle.load(file)
        result.memory["peak_in_use_all"] = watch.peak_in_use
        return result


def _partial(
    config: SimConfig, result_dir: str, watch: _MemoryWatch
) -> SimulationResult:
    """The run as far as the ranks' saved records go."""
    result = combine_ranks(config.to_json(), read_records(result_dir), config.ranks)
    result.memory["peak_in_use_all"] = watch.peak_in_use
    return result
