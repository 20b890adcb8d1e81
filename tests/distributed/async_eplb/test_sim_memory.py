"""The simulator's memory: estimate, refusal before start, a dying rank's report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vllm.distributed.async_eplb.simulation import cli, launch, memory, runner
from vllm.distributed.async_eplb.simulation.memory import (
    RANK_RUNTIME_BYTES,
    available_bytes,
    describe_exit,
    estimate_memory,
    process_memory,
)
from vllm.distributed.async_eplb.simulation.progress import (
    RankRecord,
    combine_ranks,
    read_records,
)
from vllm.distributed.async_eplb.simulation.runner import SimConfig

REPO = Path(__file__).resolve().parents[3]
GEOMETRY = dict(
    layers=4, experts=16, slots=20, ranks=2, hidden=8, itemsize=2, top_k=2,
    tokens=8, steps=10, window=4,
)  # fmt: skip


# -- the estimate ----------------------------------------------------------------
def test_estimate_parts_follow_the_geometry():
    estimate = estimate_memory(**GEOMETRY)
    expert = 8 * 8 * 2 + 8 * 2 + 8  # w, bias (bf16), scale (uint8)
    assert estimate.parts["workspace"] == 4 * 10 * expert  # layers x own slots
    assert estimate.parts["runtime"] == RANK_RUNTIME_BYTES
    assert estimate.parts["trace"] == 0
    assert estimate.per_rank == sum(estimate.parts.values())
    assert estimate.total == 2 * estimate.per_rank
    # Twice the layers: twice the workspace, the same one-layer reference.
    deeper = estimate_memory(**{**GEOMETRY, "layers": 8})
    assert deeper.parts["workspace"] == 2 * estimate.parts["workspace"]
    assert deeper.parts["reference"] == estimate.parts["reference"]
    # More ranks: fewer slots each.
    wider = estimate_memory(**{**GEOMETRY, "ranks": 4})
    assert wider.parts["workspace"] == 4 * 5 * expert


def test_on_cuda_the_weights_are_not_counted_as_host_memory():
    host = estimate_memory(**GEOMETRY)
    device = estimate_memory(**GEOMETRY, host=False)
    gpu_parts = host.parts["workspace"] + host.parts["staging"]
    assert device.per_rank == host.per_rank - gpu_parts
    assert "on the GPU" in device.describe()


def test_deepseek_v3_whole_model_on_4_ranks_fits_this_machine_by_estimate():
    estimate = SimConfig(preset="deepseek-v3", layers=None, steps=120).memory_estimate()
    assert estimate.total < 24 * 2**30
    # Its weights are FP8 in the checkpoint: one byte per element here too.
    assert SimConfig(preset="deepseek-v3").model.toy_dtype.itemsize == 1


def test_available_memory_is_read_from_the_system():
    available, source = available_bytes()
    assert available > 0
    assert source == "MemAvailable" or source.startswith("cgroup limit")


def test_process_memory_reads_this_process():
    sample = process_memory()
    assert 0 < sample.rss <= sample.peak_rss
    assert sample.pss > 0


# -- refusal before start ---------------------------------------------------------
def test_an_impossible_run_is_refused_before_any_process_starts(monkeypatch, capsys):
    def no_process(*args, **kwargs):
        raise AssertionError("a rank process was started")

    monkeypatch.setattr(cli, "launch", no_process)
    monkeypatch.setattr(launch.mp, "start_processes", no_process)
    argv = ["--preset", "deepseek-v3", "--layers", "all", "--scale", "1"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.count("\n") == 1
    estimate = SimConfig(preset="deepseek-v3", layers=None, scale=1.0).memory_estimate()
    assert err.startswith(
        f"async-eplb-simulate: error: this run needs about "
        f"{memory.gb(estimate.total)} GB (4 ranks x {memory.gb(estimate.per_rank)} GB)"
    )
    assert " GB is available (" in err
    assert "--layers" in err and "--scale" in err and "--ranks" in err


def test_the_header_shows_the_estimate(monkeypatch, capsys, tmp_path):
    def stop(config, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "launch", stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--out", str(tmp_path), "--load", "synthetic", "--no-compare"])
    header = capsys.readouterr().out.splitlines()
    assert header[2].startswith("memory: about ")
    for part in ("workspace", "staging", "reference", "load window", "trace"):
        assert part in header[2]
    assert header[2].endswith("GB available")


# -- a rank that dies --------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "text"),
    [
        (
            -signal.SIGKILL,
            "killed by the system, likely out of memory: 6.50 GB in use by the "
            "run, 2.00 GB of it by this rank",
        ),
        (-signal.SIGSEGV, "crashed with SIGSEGV"),
        (-signal.SIGTERM, "stopped by SIGTERM"),
        (3, "exited with code 3"),
    ],
)
def test_exit_causes_are_named(code, text):
    assert text in describe_exit(code, 6_500_000_000, 2_000_000_000)


def test_records_of_unfinished_ranks_make_a_partial_result(tmp_path):
    records = []
    for rank, steps in ((0, 5), (1, 3)):
        record = RankRecord(rank, tmp_path)
        record.data.update(
            phase="decoding",
            steps_done=steps,
            step_seconds=[0.1 * (rank + 1)] * steps,
            eplb_seconds=[0.01] * steps,
            rebalances=1,
            bytes_moved=100,
        )
        if rank == 0:
            record.data.update(
                balancedness=[0.5] * steps,
                balancedness_unmoved=[0.4] * steps,
                in_rebalance=[False] * steps,
                committed_layers=[0] * steps,
            )
        record.save(force=True)
        records.append(record)
    read = read_records(tmp_path)
    assert sorted(read) == [0, 1]
    result = combine_ranks({}, read, 3)
    assert result.partial is not None
    assert result.partial["steps_completed"] == 3  # every rank finished 3 steps
    assert result.partial["ranks_without_record"] == [2]
    assert result.step_seconds == [0.2] * 3  # slowest rank per step
    assert result.counters["rebalances"] == 1 and result.counters["bytes_moved"] == 200
    assert (result.outputs_checked, result.outputs_matched) == (0, 0)


def test_a_record_is_saved_at_most_once_a_second_unless_forced(tmp_path):
    record = RankRecord(0, tmp_path)
    record.save()
    record.data["steps_done"] = 7
    record.save()  # too soon: not written
    assert read_records(tmp_path)[0]["steps_done"] == 0
    record.save(force=True)
    assert read_records(tmp_path)[0]["steps_done"] == 7


def _killed_at_verification(config, model, digests, record):
    """Rank 1 dies as the kernel's OOM killer would kill it."""
    if record.data["rank"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_verify(config, model, digests, record)


real_verify = runner._verify


@pytest.mark.multirank
def test_a_killed_rank_is_named_and_the_partial_report_written(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(runner, "_verify", _killed_at_verification)  # forked ranks
    out = tmp_path / "out"
    # sync: every rebalance is over within its step, so one is counted.
    argv = [
        "--preset", "qwen3-30b-a3b", "--layers", "2", "--ranks", "2",
        "--redundant", "4", "--steps", "12", "--step-interval", "4",
        "--window", "4", "--tokens", "16", "--scale", "1e-3", "--mode", "sync",
        "--out", str(out), "--no-progress", "--no-compare",
    ]  # fmt: skip
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith(
        "async-eplb-simulate: error: rank 1 was killed by SIGKILL (Killed), "
        "killed by the system, likely out of memory: "
    )
    assert "GB in use by the run" in err
    assert "the run stopped: rank 1 was killed" in captured.out
    # Rank 0 may or may not have saved a checked layer before it was stopped.
    assert (
        "verification so far:" in captured.out
        or "verification: not reached (the run stopped before it)" in captured.out
    )
    report = json.loads((out / "report.json").read_text())
    partial = report["summary"]["partial"]
    assert partial["steps_completed"] == 12  # every rank saved its last step
    assert partial["ranks"]["1"] == {"phase": "decoding", "steps_done": 12}
    assert report["summary"]["rebalances"] >= 1
    assert len(report["balancedness"]) == 12


# -- estimate against measurement ---------------------------------------------------
@pytest.mark.multirank
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(tmp_path):
    """A small run whose data (0.36 GB a rank) weighs nearly as much as the
    runtime; sync mode, so its rebalances stage and commit within the run."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "vllm.distributed.async_eplb.simulate",
        "--preset", "deepseek-v3", "--layers", "2", "--ranks", "2",
        "--steps", "8", "--step-interval", "4", "--window", "4", "--mode", "sync",
        "--scale", "0.01", "--out", str(out), "--no-progress", "--no-compare",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    estimated = report["memory"]["estimate_per_rank"]
    assert estimated - RANK_RUNTIME_BYTES > 0.3e9  # data, not the runtime
    assert report["summary"]["layer_commits"] > 0  # the staging buffer was used
    measured = max(report["memory"]["peak_rss_per_rank"].values())
    assert abs(estimated - measured) <= 0.25 * measured, (estimated, measured)
