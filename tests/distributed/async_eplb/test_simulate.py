"""The simulated deployment: presets, configuration checks, report, and a real run."""

from __future__ import annotations

import builtins
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm.distributed.async_eplb.load_stats import predicted_balancedness
from vllm.distributed.async_eplb.maps import ExpertMaps
from vllm.distributed.async_eplb.simulation.cli import main
from vllm.distributed.async_eplb.simulation.presets import PRESETS, get_preset
from vllm.distributed.async_eplb.simulation.report import (
    SimulationResult,
    format_summary,
    percentile,
    rolling_mean,
    summarize,
    write_json,
    write_plot,
)
from vllm.distributed.async_eplb.simulation.runner import (
    RebalanceTracker,
    SimConfig,
    output_digest,
    routed_balancedness,
)

REPO = Path(__file__).resolve().parents[3]


# -- presets -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "layers", "experts", "groups", "top_k"),
    [
        ("deepseek-v3", 58, 256, 8, 8),
        ("deepseek-v2-lite", 26, 64, 1, 6),
        ("qwen3-30b-a3b", 48, 128, 1, 8),
        ("mixtral-8x7b", 32, 8, 1, 2),
    ],
)
def test_presets_follow_the_real_configs(name, layers, experts, groups, top_k):
    preset = get_preset(name)
    assert (
        preset.num_moe_layers,
        preset.num_routed_experts,
        preset.num_expert_groups,
        preset.top_k,
    ) == (layers, experts, groups, top_k)


def test_deepseek_v3_expert_is_44m_elements_and_scales_down():
    preset = get_preset("deepseek-v3")
    assert preset.expert_params == 3 * 7168 * 2048
    side = preset.toy_hidden_size(1e-3)
    assert abs(side * side / preset.expert_params - 1e-3) < 1e-5


def test_preset_errors_name_the_value():
    with pytest.raises(ValueError, match="unknown preset 'gpt-9'; known presets: "):
        get_preset("gpt-9")
    with pytest.raises(ValueError, match=r"layers must be in \[1, 32\].*got 33"):
        PRESETS["mixtral-8x7b"].with_layers(33)
    with pytest.raises(ValueError, match="scale must be in"):
        PRESETS["mixtral-8x7b"].toy_hidden_size(0.0)
    assert PRESETS["mixtral-8x7b"].with_layers(None).num_moe_layers == 32


# -- configuration ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"preset": "nope"}, "unknown preset 'nope'"),
        ({"ranks": 3}, "80 physical slots .* not divisible by --ranks 3"),
        ({"steps": 0}, "--steps must be > 0, got 0"),
        ({"redundant": -1}, "--redundant must be >= 0"),
        ({"mode": "eager"}, "--mode must be one of"),
        ({"policy": "magic"}, "--policy must be one of"),
        ({"transport": "pigeon"}, "--transport must be one of"),
        ({"transport": "ipc"}, "--transport ipc needs --device cuda"),
        ({"trace": "/nonexistent/t.npz"}, "trace file not found: /nonexistent/t.npz"),
        ({"layers": 27}, "layers must be in"),
    ],
)
def test_config_validation_refuses_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        SimConfig(**changes).validate()


def test_cuda_without_enough_gpus_is_refused():
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found >= 4:
        pytest.skip("this machine has 4 GPUs")
    if found == 0:
        with pytest.raises(ValueError, match="no CUDA device found"):
            SimConfig(device="cuda").validate()
        return
    SimConfig(device="cuda", transport="ipc").validate()  # ranks may share GPUs
    with pytest.raises(ValueError, match=r"p2p needs one GPU per rank.*--ranks 4"):
        SimConfig(device="cuda", transport="p2p").validate()  # NCCL may not


def test_auto_load_replays_the_trace_only_where_it_fits(tmp_path):
    trace = tmp_path / "t.npy"
    np.save(trace, np.ones((3, 2, 64)))
    assert SimConfig(trace=str(trace)).uses_trace()
    assert not SimConfig(preset="deepseek-v3", load="auto").uses_trace()
    assert not SimConfig(load="synthetic", trace=str(trace)).uses_trace()
    synthetic = SimConfig(preset="qwen3-30b-a3b", layers=2).make_load()
    assert synthetic.description.startswith("synthetic")
    mapped = SimConfig(preset="mixtral-8x7b", layers=3, trace=str(trace)).make_load()
    assert "mapped to 3 x 8" in mapped.description


# -- measurements -----------------------------------------------------------------
def test_routed_balancedness_counts_tokens_per_rank():
    # 4 experts on 2 ranks, expert 0 replicated onto rank 1's spare slot.
    maps = ExpertMaps(torch.tensor([[0, 1, 2, 3, 0, 1]]), 4, 2)
    ids = torch.zeros(1, 4, 1, dtype=torch.int64)  # 4 tokens, all to expert 0
    # tokens 0, 2 -> slot 0 (rank 0); 1, 3 -> slot 4 (rank 1): even.
    assert routed_balancedness(ids, maps.log2phy, maps.logcnt, 2) == 1.0
    ids[0, :, 0] = 2  # expert 2 lives on rank 1 only
    assert routed_balancedness(ids, maps.log2phy, maps.logcnt, 2) == 0.5


def test_routed_balancedness_agrees_with_the_even_split_prediction():
    phy2log = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1], [5, 4, 3, 2, 1, 0, 5, 4]])
    maps = ExpertMaps(phy2log, 6, 2)
    ids = torch.arange(6).repeat(2, 40).reshape(2, 120, 2)  # replicas split evenly
    logical = torch.stack([torch.bincount(row.flatten(), minlength=6) for row in ids])
    expected = predicted_balancedness(logical, phy2log, 4)
    assert math.isclose(
        routed_balancedness(ids, maps.log2phy, maps.logcnt, 4), expected
    )


class _Counters:
    rebalances = skips = aborts = layers_committed = 0


class _FakeEplb:
    """What RebalanceTracker reads of an EplbState, set by the test per step."""

    def __init__(self, is_async: bool) -> None:
        self.is_async = is_async
        self.counters = _Counters()
        self.expert_rearrangement_step = 1


def _in_flight(is_async: bool, steps: list[tuple[bool, bool]]) -> list[bool]:
    """The tracker's answer per step, each step (started, ended) a rebalance."""
    eplb = _FakeEplb(is_async)
    tracker = RebalanceTracker(eplb)
    answers = []
    for started, ended in steps:
        eplb.expert_rearrangement_step = 0 if started else 5
        eplb.counters.rebalances += ended
        answers.append(tracker.after_step())
    return answers


def test_back_to_back_async_rebalances_keep_every_step_in_flight():
    # Starts at step 1, ends at 3 where the next starts (the interval had
    # passed), which ends at 5; step 6 is steady.
    steps = [(False, False), (True, False), (False, False), (True, True)]
    steps += [(False, False), (False, True), (False, False)]
    assert _in_flight(True, steps) == [False, True, True, True, True, True, False]


def test_a_sync_rebalance_is_in_flight_during_its_own_step_only():
    steps = [(False, False), (True, True), (False, False), (True, True)]
    assert _in_flight(False, steps) == [False, True, False, True]


def test_output_digest_is_exact_and_ignores_the_sign_of_zero():
    x = torch.tensor([1.0, 0.0, 2.5])
    assert output_digest(x) == output_digest(torch.tensor([1.0, -0.0, 2.5]))
    assert output_digest(x) != output_digest(torch.tensor([1.0, 0.0, 2.5000002]))


# -- report ---------------------------------------------------------------------------
def _result(**changes) -> SimulationResult:
    fields = {
        "config": {"preset": "toy", "mode": "async"},
        "balancedness": [0.5, 0.5, 0.6, 0.9, 0.9, 0.9],
        "balancedness_unmoved": [0.5, 0.5, 0.5, 0.5, 0.4, 0.4],
        "step_seconds": [0.01] * 6,
        "eplb_seconds": [0.001, 0.001, 0.004, 0.002, 0.001, 0.001],
        "in_rebalance": [False, False, True, True, False, False],
        "committed_layers": [0, 0, 1, 1, 0, 0],
        "outputs_checked": 6,
        "outputs_matched": 6,
        "counters": {"rebalances": 1, "skips": 0, "aborts": 0, "bytes_moved": 3072},
    }
    fields.update(changes)
    return SimulationResult(**fields)


def test_summary_splits_before_after_and_steady_rebalancing():
    summary = summarize(_result())
    assert summary["first_rebalanced_step"] == 4
    assert summary["balancedness_before"] == pytest.approx((0.5 + 0.5 + 0.6 + 0.9) / 4)
    assert summary["balancedness_after"] == pytest.approx(0.9)
    assert summary["balancedness_unmoved_same_steps"] == pytest.approx(0.4)
    assert summary["added_ms_rebalance_p99"] == pytest.approx(4.0)
    assert summary["added_ms_steady_p50"] == pytest.approx(1.0)
    assert summary["layer_commits"] == 2
    table = format_summary(summary)
    assert "bytes moved (all ranks)                  3.0 KiB" in table
    assert "6/6 steps' MoE outputs matched the unmoved reference" in table
    assert table.endswith("OK")


def test_summary_without_a_rebalance_reports_no_after_figures(tmp_path):
    result = _result(in_rebalance=[False] * 6, committed_layers=[0] * 6)
    summary = summarize(result)
    assert summary["first_rebalanced_step"] is None
    assert math.isnan(summary["balancedness_after"])
    assert "balancedness after (once rebalanced)     n/a" in format_summary(summary)
    write_json(tmp_path / "r.json", result, summary)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["balancedness_after"] is None
    assert report["committed_layers"] == [0] * 6


def test_a_mismatch_is_reported_as_such():
    summary = summarize(_result(outputs_matched=5))
    assert format_summary(summary).endswith(
        "5/6 steps' MoE outputs matched the unmoved reference bit for bit: MISMATCH"
    )


def test_percentile_and_rolling_mean():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0
    assert math.isnan(percentile([], 50))
    assert rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_plot_is_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    assert write_plot(tmp_path / "p.png", _result())
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert not write_plot(tmp_path / "p.png", _result())
    assert not (tmp_path / "p.png").exists()


# -- command line -------------------------------------------------------------------
def test_bad_input_is_one_line_not_a_traceback(capsys, tmp_path):
    assert main(["--ranks", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("async-eplb-simulate: error: 80 physical slots")
    assert main(["--trace", str(tmp_path / "missing.npz")]) == 2
    assert "trace file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "gpt-9"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'gpt-9'" in capsys.readouterr().err


def _rank_fails(rank, config, init_method, show_progress, record_dir):
    if rank == 1:
        raise RuntimeError("staging exploded")


def test_a_failed_rank_is_one_line_with_the_traceback_saved(
    capsys, monkeypatch, tmp_path
):
    from vllm.distributed.async_eplb.simulation import launch

    monkeypatch.setattr(launch, "run_rank", _rank_fails)  # ranks are forked on CPU
    argv = ["--ranks", "2", "--out", str(tmp_path), "--load", "synthetic"]
    assert main([*argv, "--no-compare"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "async-eplb-simulate: error: rank 1 failed: RuntimeError: staging exploded "
        f"(traceback in {tmp_path / 'error.log'})"
    )
    assert "Traceback" in (tmp_path / "error.log").read_text()


def test_a_bad_knob_in_the_environment_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_ASYNC_EPLB_VOTE_DELAY", "0")
    assert main([]) == 2
    assert capsys.readouterr().err == (
        "async-eplb-simulate: error: VLLM_ASYNC_EPLB_VOTE_DELAY='0' must be >= 1\n"
    )


def test_knobs_come_from_the_environment_but_flags_win(monkeypatch):
    monkeypatch.setenv("VLLM_ASYNC_EPLB_LAYERS_PER_STEP", "2")
    monkeypatch.setenv("VLLM_ASYNC_EPLB_POLICY", "min_migration")
    knobs = SimConfig(policy="default").eplb_knobs()
    assert (knobs.layers_per_step, knobs.policy) == (2, "default")


@pytest.mark.multirank
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_small_run_rebalances_and_every_output_matches(tmp_path, mode):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "vllm.distributed.async_eplb.simulate",
        "--preset", "qwen3-30b-a3b", "--layers", "2", "--ranks", "2",
        "--redundant", "4", "--steps", "32", "--step-interval", "8",
        "--window", "8", "--tokens", "32", "--scale", "1e-3",
        "--mode", mode, "--out", str(out), "--no-progress", "--no-compare",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "32/32 steps' MoE outputs matched" in done.stdout
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["outputs_checked"] == summary["outputs_matched"] == 32
    # How many rebalances finish depends on how fast staging runs: at least one.
    assert summary["rebalances"] >= 1 and summary["aborts"] == 0
    assert summary["bytes_moved"] > 0 and summary["layer_commits"] >= 2
    assert report["config"]["mode"] == mode
    assert report["config"]["eplb_knobs"]["policy"] == "min_migration"
    assert report["config"]["load_description"].startswith("synthetic")
    assert len(report["balancedness"]) == len(report["eplb_seconds"]) == 32
    assert all(0 < b <= 1 for b in report["balancedness"])
    if mode == "async":  # layers commit on different steps, one per step
        assert max(report["committed_layers"]) == 1
    else:
        assert max(report["committed_layers"]) == 2
