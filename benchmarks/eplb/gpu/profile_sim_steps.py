"""What the slow steps of the simulated deployment spend (issue 13).

Runs ``python -m vllm.distributed.async_eplb.simulate`` with the same arguments,
and in every rank process:

- profiles each ``EplbState.step()`` of the main thread with ``cProfile``
  (wall clock) and keeps the profile of every step over ``--slow-ms``: the
  calls that took the time, with the main thread's CPU time beside the wall
  time (wall much larger than CPU: the thread waited, for the GIL, a lock or
  the device);
- logs, with the same clock, what the helper threads did: the staging
  worker's layers (``StagingWorker._stage``), the commit's copies it makes
  ready (``_commit_kit``), its waits at the step gate
  (``StagingThread.pause``), Python's garbage collections (``gc.genN``, on
  whichever thread), the transport's job start
  (``prepare_job``), each layer's transfer (``stage_layer``), and the
  planner (``plan_thread.compute_plans``) and its pauses between pieces
  (``PlannerThread._pause``);
- counts, per step, the main thread's context switches (voluntary: it
  blocked on the GIL, a lock or a wait; involuntary: the OS preempted it);
- times, per step, the main-thread calls of the step's parts (votes,
  commits, load window), wall and CPU, without cProfile (``--timers-only``
  leaves cProfile out: on Python 3.12 it sees every thread's calls and slows
  them all); ``--plain`` keeps only each step's wall and CPU time (for
  figures: no profiler, no timers); ``--trace-commits`` records, in place of
  the timers, every call the main thread makes inside a commit
  (``RoundDriver._commit_ready``, through ``sys.setprofile``: C calls
  included), so the summary names what a slow commit spends its time in
  (each call's self time, the profiler's own cost spread over all of them);
  ``--trace-steps`` does the same for the whole step (``EplbState._step``).

``--switch-interval-ms X`` sets Python's GIL switch interval in the ranks.
``--slow-copy-ms X`` prints every main-thread ``torch._foreach_copy_`` slower
than X ms with its tensors' shapes, dtypes and alignments.
``--gpu-forward-ms X`` makes each decode step a decode-sized stand-in: after
the toy forward, the device is kept busy for X ms and the main thread waits
for it (GIL released), as a model runner waits for a GPU-bound forward.

Writes ``<out-dir>/profile_rank<r>.json`` and prints, per rank, the slow steps
with their top calls and the helper-thread intervals that overlapped them.

    python benchmarks/eplb/gpu/profile_sim_steps.py --out-dir prof -- \\
        --device cuda --ranks 2 --no-progress --out prof/sim

cProfile slows Python code (about 2x on the step's own work): compare the
slow steps' calls, not their absolute times, with an unprofiled run.
"""

from __future__ import annotations

import cProfile
import functools
import gc
import json
import os
import pstats
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

_OUT_ENV = "EPLB_PROFILE_OUT"
_SLOW_ENV = "EPLB_PROFILE_SLOW_MS"
_MODE_ENV = "EPLB_PROFILE_MODE"  # comma-separated flags: timers-only, plain
_SWITCH_ENV = "EPLB_PROFILE_SWITCH_MS"
_FORWARD_ENV = "EPLB_PROFILE_GPU_FORWARD_MS"
_COPIES_ENV = "EPLB_PROFILE_SLOW_COPY_MS"
# Main-thread parts of a step, timed per step: (module, class, method).
_PARTS = [
    ("round_driver", "RoundDriver", "collect"),
    ("round_driver", "RoundDriver", "_launch_ready_vote"),
    ("round_driver", "RoundDriver", "_commit_ready"),
    ("eplb_state", "EplbState", "rearrange"),
    ("worker", "StagingWorker", "commit_layer"),
    ("worker", "StagingWorker", "staged_layers"),
    ("load_stats", "LoadWindow", "record"),
    ("load_stats", "LoadWindow", "total"),
    ("agreement", "NonBlockingVote", "launch"),
    ("agreement", "NonBlockingVote", "collect"),
    ("maps", "ExpertMaps", "commit_prepared"),
    ("device", "DeviceBackend", "wait_event"),
    ("device", "DeviceBackend", "record_event"),
    ("round_driver", "RoundDriver", "_finish_rebalance"),
    ("load_stats", "LoadWindow", "placement_changed"),
]


class _Recorder:
    """Per-process store: slow main-thread steps and helper-thread intervals."""

    def __init__(self, out_dir: Path, slow_ms: float, modes: set[str]) -> None:
        self.out_dir = out_dir
        self.slow_s = slow_ms / 1e3
        self.modes = modes
        self.parts: dict[str, list[float]] = {}  # part -> [wall, cpu] this step
        self.steps: list[dict[str, Any]] = []
        self.slow: list[dict[str, Any]] = []
        self.intervals: list[dict[str, Any]] = []
        self.commit_traces: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def interval(self, name: str, start: float, end: float, **extra: Any) -> None:
        with self.lock:
            self.intervals.append(
                {
                    "name": name,
                    "thread": threading.current_thread().name,
                    "start": start,
                    "end": end,
                    **extra,
                }
            )

    def dump(self, rank: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"profile_rank{rank}.json"
        path.write_text(
            json.dumps(
                {
                    "steps": self.steps,
                    "slow": self.slow,
                    "intervals": self.intervals,
                    "commit_traces": self.commit_traces,
                }
            )
        )


def _top_calls(profile: cProfile.Profile, n: int = 14) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile)
    rows = []
    for (file, line, func), (_, ncalls, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "func": f"{Path(file).name}:{line}:{func}",
                "ncalls": ncalls,
                "tottime_ms": 1e3 * tt,
                "cumtime_ms": 1e3 * ct,
            }
        )
    by_tot = sorted(rows, key=lambda r: -r["tottime_ms"])[:n]
    by_cum = sorted(rows, key=lambda r: -r["cumtime_ms"])[:n]
    return [{"by": "tottime", **r} for r in by_tot] + [
        {"by": "cumtime", **r} for r in by_cum
    ]


def _install(recorder: _Recorder) -> None:
    """Wrap the methods whose timing we want (this process only)."""
    import torch

    from vllm.distributed.async_eplb import eplb_state, plan_thread, worker
    from vllm.distributed.async_eplb.transports import Transport

    step_index = _STEP_INDEX
    original_step = eplb_state.EplbState.step

    @functools.wraps(original_step)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("is_profile") or (len(args) > 1 and args[1]):
            return original_step(self, *args, **kwargs)
        quiet = recorder.modes - {"switch"}  # any mode: no cProfile
        profile = None if quiet else cProfile.Profile()
        recorder.parts = {}
        switches0 = _thread_switches()
        cpu0, t0 = time.thread_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        try:
            return original_step(self, *args, **kwargs)
        finally:
            if profile is not None:
                profile.disable()
            t1, cpu1 = time.perf_counter(), time.thread_time()
            switches1 = _thread_switches()
            index = step_index[0]
            step_index[0] += 1
            record = {
                "step": index,
                "start": t0,
                "end": t1,
                "wall_ms": 1e3 * (t1 - t0),
                "cpu_ms": 1e3 * (cpu1 - cpu0),
                # the main thread's context switches in the step: voluntary
                # (it blocked: the GIL, a lock, a wait), involuntary (preempted)
                "switches": [b - a for a, b in zip(switches0, switches1, strict=True)],
                "phase": str(getattr(self, "_phase", "")),
                "parts": {k: [1e3 * v for v in wc] for k, wc in recorder.parts.items()},
            }
            recorder.steps.append(record)
            if t1 - t0 > recorder.slow_s:
                calls = _top_calls(profile) if profile is not None else []
                recorder.slow.append({**record, "calls": calls})

    eplb_state.EplbState.step = step  # type: ignore[method-assign]

    def timed(cls: Any, name: str) -> None:
        original = getattr(cls, name, None)
        if original is None:  # not in this version of the code
            print(f"profile_sim_steps: no {cls.__name__}.{name}", file=sys.stderr)
            return

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                recorder.interval(f"{cls.__name__}.{name}", start, time.perf_counter())

        setattr(cls, name, wrapper)

    import importlib

    tracing = bool(recorder.modes & {"trace-commits", "trace-steps"})  # no timers
    if "plain" not in recorder.modes and not tracing:
        for module, cls_name, name in _PARTS:
            cls = getattr(importlib.import_module(f"{_PKG}.{module}"), cls_name)
            _time_part(recorder, cls, name)
        # the commit's copies: the weight runs, and every fused copy (maps too)
        _time_part(recorder, worker, "copy_rows")
        _time_part(recorder, torch, "_foreach_copy_")
    if "plain" not in recorder.modes:
        timed(worker.StagingWorker, "_stage")
        timed(worker.StagingWorker, "_commit_kit")  # staging thread, per layer
        timed(worker.StagingThread, "pause")  # parked while a step runs
        timed(worker.StagingWorker, "commit_layer")
        timed(plan_thread, "compute_plans")  # what the planner thread runs
        timed(plan_thread.PlannerThread, "_pause")  # parked while a step runs
        _log_gc(recorder)
        if "trace-commits" in recorder.modes:
            from vllm.distributed.async_eplb import round_driver

            _trace_calls(recorder, round_driver.RoundDriver, "_commit_ready")
        if "trace-steps" in recorder.modes:
            _trace_calls(recorder, eplb_state.EplbState, "_step")
        for sub in _transport_classes(Transport):
            for name in ("prepare_job", "stage_layer"):
                if name in vars(sub):
                    timed(sub, name)

    original_shutdown = eplb_state.EplbState.shutdown

    @functools.wraps(original_shutdown)
    def shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original_shutdown(self, *args, **kwargs)
        finally:
            recorder.dump(self.ep.rank)

    eplb_state.EplbState.shutdown = shutdown  # type: ignore[method-assign]


_PKG = "vllm.distributed.async_eplb"
_STEP_INDEX = [0]  # the rank's next step (not counting the profile run's)


def _thread_switches() -> tuple[int, int]:
    """The calling thread's (voluntary, involuntary) context switches so far."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_nvcsw, usage.ru_nivcsw


def _log_gc(recorder: _Recorder) -> None:
    """Log Python's garbage collections (thread, generation) as intervals:
    a collection holds the GIL, whichever thread runs it."""
    started: dict[int, float] = {}

    def callback(phase: str, info: dict[str, int]) -> None:
        key = threading.get_ident()
        if phase == "start":
            started[key] = time.perf_counter()
        elif key in started:
            start = started.pop(key)
            name = f"gc.gen{info['generation']}"
            recorder.interval(name, start, time.perf_counter())

    gc.callbacks.append(callback)


def _gpu_forward(ms: float) -> None:
    """Make every toy forward a GPU-bound decode step of about ``ms``."""
    import torch

    from vllm.distributed.async_eplb.simulation import toy_moe

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles = int(10_000_000 * ms / start.elapsed_time(end))
    original = toy_moe.ToyMoE.forward

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        torch.cuda._sleep(cycles)
        torch.cuda.synchronize()  # the main thread waits, GIL released
        return out

    toy_moe.ToyMoE.forward = forward  # type: ignore[method-assign]


def _time_part(recorder: _Recorder, cls: Any, name: str) -> None:
    """Add this method's main-thread wall and CPU time to the step's parts."""
    original = getattr(cls, name, None)
    if original is None:  # not in this version of the code
        print(f"profile_sim_steps: no {cls.__name__}.{name}", file=sys.stderr)
        return
    key = f"{cls.__name__}.{name}"

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return original(*args, **kwargs)
        cpu0, t0 = time.thread_time(), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            wc = recorder.parts.setdefault(key, [0.0, 0.0])
            wc[0] += time.perf_counter() - t0
            wc[1] += time.thread_time() - cpu0

    setattr(cls, name, wrapper)


def _call_name(frame: Any, event: str, arg: Any) -> str:
    if event.startswith("c_"):
        owner = getattr(arg, "__self__", None)
        prefix = "" if owner is None else f"{type(owner).__name__}."
        return f"{prefix}{getattr(arg, '__name__', repr(arg))}"
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{code.co_qualname}"


def _trace_calls(recorder: _Recorder, cls: Any, name: str) -> None:
    """Record each main-thread call of this method with the self time of
    every call it makes (Python and C), from ``sys.setprofile``."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return original(*args, **kwargs)
        self_s: dict[str, list[float]] = {}  # name -> [count, self seconds]
        stack: list[list[Any]] = []  # [name, start, time in children]

        def profiler(frame: Any, event: str, arg: Any) -> None:
            now = time.perf_counter()
            if event in ("call", "c_call"):
                stack.append([_call_name(frame, event, arg), now, 0.0])
            elif stack:  # return, c_return, c_exception
                called, start, children = stack.pop()
                spent = now - start
                entry = self_s.setdefault(called, [0, 0.0])
                entry[0] += 1
                entry[1] += spent - children
                if stack:
                    stack[-1][2] += spent

        t0 = time.perf_counter()
        sys.setprofile(profiler)
        try:
            return original(*args, **kwargs)
        finally:
            sys.setprofile(None)
            t1 = time.perf_counter()
            recorder.commit_traces.append(
                {
                    "start": t0,
                    "wall_ms": 1e3 * (t1 - t0),
                    "calls": {k: [n, 1e3 * v] for k, (n, v) in self_s.items()},
                }
            )

    setattr(cls, name, wrapper)


def _transport_classes(base: type) -> list[type]:
    from vllm.distributed.async_eplb.transports import gloo_staged, ipc, p2p

    del gloo_staged, ipc, p2p  # imported so that their classes exist
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def _summarize(out_dir: Path) -> None:
    for path in sorted(out_dir.glob("profile_rank*.json")):
        data = json.loads(path.read_text())
        busy = [st for st in data["steps"] if st["phase"] != "idle"]
        walls = sorted(st["wall_ms"] for st in busy) or [0.0]
        print(
            f"== {path.name}: {len(data['slow'])} slow steps; {len(busy)} steps "
            f"not idle: wall p50 {walls[len(walls) // 2]:.3f} p99 "
            f"{walls[int(0.99 * (len(walls) - 1))]:.3f} max {walls[-1]:.3f} ms"
        )
        totals: dict[str, list[float]] = {}
        for st in busy:
            for k, (w, c) in st["parts"].items():
                t = totals.setdefault(k, [0, 0.0, 0.0, 0.0])
                t[0] += 1
                t[1] += w
                t[2] += c
                t[3] = max(t[3], w)
        for k, (n, w, c, top) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
            print(
                f"    {k:34s} x{n:4d}  mean wall {w / n:.3f}  cpu {c / n:.3f}"
                f"  max wall {top:.3f} ms"
            )
        for slow in sorted(data["slow"], key=lambda s: -s["wall_ms"])[:8]:
            print(
                f"step {slow['step']} ({slow['phase']}): wall {slow['wall_ms']:.2f} ms,"
                f" main-thread cpu {slow['cpu_ms']:.2f} ms,"
                f" context switches voluntary/involuntary {slow['switches']}"
            )
            parts = sorted(slow["parts"].items(), key=lambda kv: -kv[1][0])
            print(
                "    parts (wall/cpu ms): "
                + ", ".join(f"{k} {w:.2f}/{c:.2f}" for k, (w, c) in parts[:6])
            )
            for call in [c for c in slow["calls"] if c["by"] == "tottime"][:6]:
                print(
                    f"    {call['tottime_ms']:8.2f} ms self  {call['cumtime_ms']:8.2f}"
                    f" cum  x{call['ncalls']}  {call['func']}"
                )
            for iv in data["intervals"]:
                if iv["end"] > slow["start"] and iv["start"] < slow["end"]:
                    print(
                        f"    overlapping: {iv['name']} on {iv['thread']}"
                        f" {1e3 * (iv['end'] - iv['start']):.2f} ms"
                    )
        _print_commit_traces(data)


def _print_commit_traces(data: dict[str, Any]) -> None:
    """The slowest traced calls (commits or steps): their calls by self time,
    beside each call's median self time over all traced calls of the rank."""
    traces = data.get("commit_traces", [])
    if not traces:
        return
    per_name: dict[str, list[float]] = {}
    for trace in traces:
        for k, (_, ms) in trace["calls"].items():
            per_name.setdefault(k, []).append(ms)
    median = {k: sorted(v)[len(v) // 2] for k, v in per_name.items()}
    walls = sorted(t["wall_ms"] for t in traces)
    print(
        f"    traced calls x{len(traces)}: wall median {walls[len(walls) // 2]:.3f}"
        f" max {walls[-1]:.3f} ms (profiler included)"
    )
    for trace in sorted(traces, key=lambda t: -t["wall_ms"])[:6]:
        at = trace["start"]
        steps = [s["step"] for s in data["steps"] if s["start"] <= at <= s["end"]]
        step = steps[0] if steps else "?"
        print(f"    traced call at step {step}: {trace['wall_ms']:.3f} ms")
        calls = sorted(trace["calls"].items(), key=lambda kv: -kv[1][1])[:8]
        for k, (n, ms) in calls:
            print(f"      {ms:7.3f} ms self x{n:<3d} (median {median[k]:.3f})  {k}")


def _configure_rank() -> None:
    """Knobs of the rank processes (set before their first step)."""
    if os.environ.get(_SWITCH_ENV):
        sys.setswitchinterval(float(os.environ[_SWITCH_ENV]) / 1e3)
    if os.environ.get(_FORWARD_ENV):
        from vllm.distributed.async_eplb import eplb_state

        original = eplb_state.EplbState.add_model

        @functools.wraps(original)
        def add_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            _gpu_forward(float(os.environ[_FORWARD_ENV]))  # CUDA is set up now
            return original(self, *args, **kwargs)

        eplb_state.EplbState.add_model = add_model  # type: ignore[method-assign]
    if os.environ.get(_COPIES_ENV):
        _log_slow_copies(float(os.environ[_COPIES_ENV]))


def _log_slow_copies(slow_ms: float) -> None:
    """Print each main-thread ``torch._foreach_copy_`` slower than ``slow_ms``
    (a commit makes two: the map rows, the weight runs), with what it copied:
    shapes, dtypes, and each address modulo 16."""
    import torch

    original = torch._foreach_copy_

    @functools.wraps(original)
    def foreach_copy(dst: Any, src: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return original(dst, src, **kwargs)
        start = time.perf_counter()
        try:
            return original(dst, src, **kwargs)
        finally:
            ms = 1e3 * (time.perf_counter() - start)
            if ms > slow_ms:
                what = [
                    (
                        tuple(d.shape),
                        str(d.dtype)[6:],
                        d.data_ptr() % 16,
                        s.data_ptr() % 16,
                    )
                    for d, s in zip(dst, src, strict=True)
                ]
                print(
                    f"slow copy pid {os.getpid()} step {_STEP_INDEX[0]}:"
                    f" {ms:.3f} ms {what}",
                    file=sys.stderr,
                )

    torch._foreach_copy_ = foreach_copy


def _recorder_from_env() -> _Recorder:
    modes = set(filter(None, os.environ.get(_MODE_ENV, "").split(",")))
    return _Recorder(Path(os.environ[_OUT_ENV]), float(os.environ[_SLOW_ENV]), modes)


if os.environ.get(_OUT_ENV):  # in every process, rank processes included
    _install(_recorder_from_env())
    _configure_rank()


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    own, sim_args = argv[:split], argv[split + 1 :]
    out_dir = Path(own[own.index("--out-dir") + 1]) if "--out-dir" in own else None
    slow_ms = float(own[own.index("--slow-ms") + 1]) if "--slow-ms" in own else 1.0
    if out_dir is None:
        print("--out-dir is required", file=sys.stderr)
        return 2
    os.environ[_OUT_ENV] = str(out_dir)
    os.environ[_SLOW_ENV] = str(slow_ms)
    flags = ("timers-only", "plain", "trace-commits", "trace-steps")
    os.environ[_MODE_ENV] = ",".join(m for m in flags if f"--{m}" in own)
    for flag, env in (
        ("--switch-interval-ms", _SWITCH_ENV),
        ("--gpu-forward-ms", _FORWARD_ENV),
        ("--slow-copy-ms", _COPIES_ENV),
    ):
        if flag in own:
            os.environ[env] = own[own.index(flag) + 1]
    _install(_recorder_from_env())  # forked ranks (CPU) inherit it
    _configure_rank()
    # Spawned rank processes re-import this file as __mp_main__ and patch
    # themselves from the environment (see above).
    from vllm.distributed.async_eplb.simulation.cli import main as simulate

    code = simulate(sim_args)
    _summarize(out_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
