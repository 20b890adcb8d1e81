"""Device ops and host time of ``LoadWindow.total()``, the rebalance's first
step on the engine's thread: on an H200 host each small torch op costs the
thread ~0.05-0.1 ms, so the count of ops is the cost there.

Counts the ops ``total()`` dispatches (views left out: they launch nothing)
and times it on the CPU, with one placement version in the window and with
several. ``--before`` loads another copy of ``load_stats.py`` (e.g. an older
commit's, from ``git show``) and times both, repeats interleaved, so a load
change on a shared machine hits both alike:

    git show fed809c:vllm/distributed/async_eplb/load_stats.py > /tmp/before.py
    python benchmarks/eplb/bench_window_fold.py --before /tmp/before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from types import ModuleType

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _CountOps(TorchDispatchMode):
    """Records every torch op that runs a kernel (views left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func).removeprefix("aten."))
        return func(*args, **(kwargs or {}))


def _load_stats(module_file: str | None) -> ModuleType:
    """This tree's ``load_stats`` or, from ``module_file``, another copy."""
    if module_file is None:
        from vllm.distributed.async_eplb import load_stats

        return load_stats
    spec = importlib.util.spec_from_file_location("load_stats_before", module_file)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load a module from {module_file!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _filled_window(module: ModuleType, args: argparse.Namespace, versions: int):
    """A full window whose steps ran under ``versions`` placements, commits
    spread evenly over it."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.layers, args.slots)

    def placement() -> torch.Tensor:
        return torch.randint(args.experts, shape, generator=gen)

    window = module.LoadWindow(args.window, placement(), args.experts)
    every = args.window // versions
    for step in range(args.window):
        if step and step % every == 0 and step // every < versions:
            window.placement_changed(placement())
        window.record(torch.randint(0, 1000, shape, generator=gen))
    return window


def _ops(window) -> list[str]:
    with _CountOps() as count:
        window.total()
    return count.ops


def _time_ms(window, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        window.total()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="a load_stats.py to compare against")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=80)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if min(args.versions) < 1 or max(args.versions) > args.window:
        raise ValueError(f"--versions {args.versions} must lie in 1..{args.window}")
    torch.set_num_threads(1)
    modules = {"this tree": _load_stats(None)}
    if args.before:
        modules["before"] = _load_stats(args.before)
    print(
        f"[{args.layers} x {args.slots}] -> {args.experts} experts, window "
        f"{args.window}; median of {args.repeats} means of {args.calls} calls; "
        "1 thread"
    )
    for versions in args.versions:
        windows = {k: _filled_window(m, args, versions) for k, m in modules.items()}
        totals = [w.total() for w in windows.values()]
        if any(not torch.equal(t, totals[0]) for t in totals):
            raise RuntimeError("the two copies' totals differ")
        means: dict[str, list[float]] = {k: [] for k in windows}
        for _ in range(args.repeats):
            for k, window in windows.items():
                means[k].append(_time_ms(window, args.calls))
        for k, window in windows.items():
            found = len(set(window._version_of_step) - {-1})
            ops = _ops(window)
            print(
                f"{k}, {versions} version(s) (found {found}): {len(ops)} ops "
                f"({', '.join(ops)}), "
                f"{statistics.median(means[k]) * 1e3:.1f} us per total()"
            )


if __name__ == "__main__":
    main()
