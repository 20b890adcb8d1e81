"""``--compare``: vLLM's EplbState and ours side by side (issue 14, part 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.simulation import vllm_baseline
from vllm.distributed.async_eplb.simulation.collectives import CollectiveCounter
from vllm.distributed.async_eplb.simulation.compare import (
    compare_summary,
    experts_received,
    format_comparison,
)
from vllm.distributed.async_eplb.simulation.report import SimulationResult
from vllm.distributed.async_eplb.simulation.runner import SimConfig

REPO = Path(__file__).resolve().parents[3]


def test_experts_received_counts_what_crosses_ranks_once_per_rank():
    # 2 ranks x 3 slots, one layer. Rank 0: [0, 1, 2] -> [0, 3, 3]: expert 3
    # comes from rank 1, once for both slots. Rank 1: [3, 4, 5] -> [1, 4, 0]:
    # experts 1 and 0 come from rank 0. A move within a rank costs nothing.
    old = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    new = torch.tensor([[0, 3, 3, 1, 4, 0], [2, 1, 0, 3, 4, 5]])
    assert experts_received(old, new, 2).tolist() == [1, 2]
    assert experts_received(old, old, 2).tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"divisible by 4 ranks, got \(2, 6\)"):
        experts_received(old, new, 4)


def _result(
    mode: str, eplb_ms: list[float], busy: list[bool], **kw
) -> SimulationResult:
    steps = len(eplb_ms)
    return SimulationResult(
        config={"mode": mode, "preset": "p", "layers": 2, "ranks": 2, "redundant": 2},
        balancedness=[0.5, 0.5, 0.9, 0.9][:steps],
        balancedness_unmoved=[0.5] * steps,
        step_seconds=[0.010 + t / 1e3 for t in eplb_ms],
        eplb_seconds=[t / 1e3 for t in eplb_ms],
        in_rebalance=busy,
        committed_layers=[0, 1, 1, 0][:steps],
        outputs_checked=steps,
        outputs_matched=kw.pop("matched", steps),
        counters={"rebalances": 1},
        **kw,
    )


def test_a_column_per_implementation_with_its_own_figures():
    vllm = _result(
        "sync",
        [0.1, 50.0, 0.1, 0.1],
        [False, True, False, False],
        experts_received=[0, 6, 0, 0],
        bytes_received=[0, 6 << 20, 0, 0],
        blocking_collectives=[0, 3, 0, 0],
    )
    ours = _result(
        "async",
        [0.1, 0.3, 0.4, 0.1],
        [False, True, True, False],
        experts_received=[0, 1, 1, 0],
        bytes_received=[0, 1 << 20, 1 << 20, 0],
        blocking_collectives=[0, 0, 0, 0],
        matched=3,
    )
    columns = {"vllm": compare_summary(vllm), "ours": compare_summary(ours)}
    assert columns["vllm"]["added_ms_rebalance_max"] == pytest.approx(50.0)
    assert columns["vllm"]["experts_moved_per_rebalance"] == 6
    assert columns["vllm"]["bytes_moved_per_rebalance"] == 6 << 20
    assert columns["vllm"]["blocking_collectives_per_step"] == 0.75
    assert columns["ours"]["added_ms_rebalance_p50"] == pytest.approx(0.3)
    assert columns["ours"]["bytes_moved_per_rebalance"] == 2 << 20
    # the slowest whole step minus the median one (nearest rank)
    assert columns["ours"]["longest_stall_ms"] == pytest.approx(0.3)
    assert columns["vllm"]["longest_stall_ms"] == pytest.approx(49.9)
    assert columns["vllm"]["verified"] and not columns["ours"]["verified"]
    table = format_comparison(columns)
    lines = table.splitlines()
    assert "vLLM EplbState (sync)" in lines[0] and "async_eplb (async)" in lines[0]
    assert "6.00 MiB" in table and "2.00 MiB" in table
    assert lines[-2].split()[-4:] == ["4/4", "OK", "3/4", "MISMATCH"]


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_only_armed_blocking_calls_on_the_forward_thread_count(
    one_rank_group, monkeypatch
):
    # A module that imported the collective by name, as vLLM's eplb_state does.
    alias = types.ModuleType("vllm.distributed.eplb.fake_for_test")
    alias.all_reduce = dist.all_reduce
    monkeypatch.setitem(sys.modules, alias.__name__, alias)
    original = dist.all_reduce
    counter = CollectiveCounter()
    uninstall = counter.install()
    try:
        tensor = torch.ones(1)
        dist.all_reduce(tensor)  # not armed
        counter.armed = True
        dist.all_reduce(tensor)
        alias.all_reduce(tensor)
        dist.barrier()
        dist.all_reduce(tensor, async_op=True).wait()  # not blocking
        other = threading.Thread(target=dist.all_reduce, args=(tensor,))
        other.start()
        other.join()
        counter.armed = False
        assert counter.take() == 3
        assert counter.take() == 0
    finally:
        uninstall()
    assert alias.all_reduce is original and dist.all_reduce is original


def test_vllms_eplb_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="implementation must be one of"):
        SimConfig(implementation="sglang").validate()
    if not vllm_baseline.available():
        with pytest.raises(ValueError, match="needs vLLM installed"):
            SimConfig(implementation="vllm", mode="sync").validate()
        return
    with pytest.raises(ValueError, match="sync mode on cpu only") as info:
        SimConfig(implementation="vllm", mode="async").validate()
    assert vllm_baseline.ASYNC_MISSING in str(info.value)
    SimConfig(implementation="vllm", mode="sync").validate()


@pytest.mark.skipif(not vllm_baseline.available(), reason="needs vLLM")
@pytest.mark.vllm
@pytest.mark.multirank
def test_a_small_compare_run_has_both_columns_both_bit_exact(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "vllm.distributed.async_eplb.simulate",
        "--preset", "qwen3-30b-a3b", "--layers", "2", "--ranks", "2",
        "--redundant", "4", "--steps", "32", "--step-interval", "8",
        "--window", "8", "--tokens", "32", "--scale", "1e-3",
        "--policy", "default", "--out", str(out), "--no-progress", "--compare",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any("vLLM EplbState (sync)  async_eplb (async)" in line for line in lines)
    verified = next(line for line in lines if line.startswith("outputs verified"))
    assert verified.split()[-4:] == ["32/32", "OK", "32/32", "OK"]
    assert "vLLM's async EPLB is not compared" in done.stdout
    report = json.loads((out / "report.json").read_text())
    columns = report["compare"]["columns"]
    assert set(columns) == {"vllm", "ours"}
    for name, column in columns.items():
        assert column["verified"], name
        assert column["outputs_checked"] == column["outputs_matched"] == 32
        assert column["rebalances"] >= 1, name
    baseline = report["compare"]["baseline"]
    assert baseline["config"]["implementation"] == "vllm"
    assert baseline["config"]["mode"] == "sync"
    assert report["config"]["implementation"] == "ours"
    # vLLM's sync rearrangement all-reduces the load and waits for its weight
    # exchange on the forward thread; ours votes without blocking.
    assert max(baseline["blocking_collectives"]) >= 1
    assert columns["ours"]["blocking_collectives_per_step"] == 0
    assert sum(baseline["bytes_received"]) > 0
    assert (out / "plot.png").is_file() or "plot skipped" in done.stdout
