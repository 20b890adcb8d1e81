"""What VLLM_ASYNC_EPLB_RECORD costs the engine's main thread.

The step loop's part of a recording is ``LoadRecorder.add_window`` (a lock
and two appends); the conversion and the file write run on the recorder's
thread, which still takes the GIL while numpy and zipfile run Python. Here the
main thread runs a fixed stand-in step (small matmuls plus some Python, as
the engine's own Python between kernels) over and over; every ``--interval``
steps it hands the recorder a DeepSeek-V3-sized window (58 layers x 256
experts), with the recorder already holding ``MAX_WINDOWS - 1`` windows, so
every write rewrites a full file (~30 MB). Steps are timed with and without
the recorder in alternating blocks (same process, same heap).

    python benchmarks/eplb/bench_recording.py [--steps 3000] [--interval 50]
        [--blocks 6] [--dir /tmp] [--json PATH]

Needs torch and numpy only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vllm.distributed.async_eplb.recording import MAX_WINDOWS, LoadRecorder

LAYERS, EXPERTS = 58, 256


def _step(a: torch.Tensor, b: torch.Tensor) -> None:
    """A stand-in step: a few small matmuls and some Python between them."""
    total = 0
    for _ in range(4):
        torch.mm(a, b)
        total += sum(range(2000))


def _block(steps: int, interval: int, recorder: LoadRecorder | None) -> list[float]:
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    window = torch.randint(0, 10_000, (LAYERS, EXPERTS), dtype=torch.int64)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        _step(a, b)
        if recorder is not None and step % interval == 0:
            recorder.add_window(window.clone())
        times.append(time.perf_counter() - start)
    return times


def _stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "mean_ms": 1e3 * statistics.fmean(times),
        "p50_ms": 1e3 * ordered[len(ordered) // 2],
        "p99_ms": 1e3 * ordered[int(0.99 * (len(ordered) - 1))],
        "max_ms": 1e3 * ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="steps per block")
    parser.add_argument("--interval", type=int, default=50, help="steps per window")
    parser.add_argument("--blocks", type=int, default=6, help="blocks of each kind")
    parser.add_argument("--dir", default=None, help="where the recording goes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.set_num_threads(1)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="bench-recording-"))
    recorder = LoadRecorder(directory / "rec.npz", {"model": "bench"})
    window = torch.randint(0, 10_000, (LAYERS, EXPERTS), dtype=torch.int64)
    for _ in range(MAX_WINDOWS - 1):  # steady state: a full file per write
        recorder.add_window(window.clone())

    calls = []
    for _ in range(2000):  # what the step loop itself pays per window
        start = time.perf_counter()
        recorder.add_window(window)
        calls.append(time.perf_counter() - start)
    time.sleep(2.0)
    writes_before = recorder.writes
    start = time.perf_counter()
    recorder.add_window(window)
    while recorder.writes == writes_before:
        time.sleep(0.001)
    write_seconds = time.perf_counter() - start

    _block(200, args.interval, None)  # warm-up
    writes_before = recorder.writes
    off: list[float] = []
    on: list[float] = []
    for _ in range(args.blocks):
        off += _block(args.steps, args.interval, None)
        time.sleep(0.5)
        on += _block(args.steps, args.interval, recorder)
        time.sleep(2.0)  # let the last write finish outside the next block
    writes = recorder.writes - writes_before
    recorder.close()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "file_mb": (directory / "rec.npz").stat().st_size / 2**20,
        "add_window_us_p50": 1e6 * sorted(calls)[len(calls) // 2],
        "add_window_us_p99": 1e6 * sorted(calls)[int(0.99 * (len(calls) - 1))],
        "one_full_write_s": write_seconds,
        "writes_during_on_blocks": writes,
        "steps_per_block": args.steps,
        "interval": args.interval,
        "without_recorder": _stats(off),
        "with_recorder": _stats(on),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
