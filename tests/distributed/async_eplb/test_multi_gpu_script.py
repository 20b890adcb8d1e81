"""The several-GPU benchmark (issue 8) runs end to end: bit-exact, no error.

On CPU ranks (gloo for everything) it checks the script's logic: the transfer
part's one-way moves and the safety part's rebalances beside a live
all-to-all, each rebalance checked bit-exact. On 2+ GPUs the same with NCCL,
``p2p`` and ``ipc``, at small sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchrun_util import REPO, run_torchrun

SCRIPT = REPO / "benchmarks" / "eplb" / "gpu" / "bench_multi_gpu.py"
REBALANCES = 5
STEPS = 60


def run_script(tmp_path: Path, device: str, transports: str, extra: list[str]) -> dict:
    out = tmp_path / "multi_gpu.json"
    args = [
        "--device", device,
        "--transports", transports,
        "--steps", str(STEPS),
        "--rebalances", str(REBALANCES),
        "--layers", "3",
        "--reps", "3",
        "--timeout", "60",
        "--json", str(out),
        *extra,
    ]  # fmt: skip
    run_torchrun(SCRIPT, 2, args, timeout=120)
    return json.loads(out.read_text())


def assert_report(report: dict, transports: list[str]) -> None:
    assert report["errors"] == []
    assert report["world"] == 2
    assert report["env"]["NCCL_NVLS_ENABLE"] == "0"
    (pair,) = report["transfer"]["pairs"]
    assert (pair["src"], pair["dst"]) == (0, 1)
    for name in ["floor", *transports]:
        assert pair[name]["bit_exact"] is True, name
        assert pair[name]["device_GBps"] > 0
    safety = report["safety"]
    for name in transports:
        run = safety[name]
        assert run["rebalances"] >= REBALANCES, run
        assert run["layers_committed"] == 3 * run["rebalances"], run
        assert run["steps"] >= STEPS
        assert run["bit_exact"] is True and run["checks_failed"] == [], run
    assert safety["none"]["steps"] == STEPS


@pytest.mark.multirank
def test_multi_gpu_script_on_cpu_ranks(tmp_path: Path) -> None:
    report = run_script(tmp_path, "cpu", "p2p,gloo-staged", ["--expert-bytes", "4096"])
    assert_report(report, ["p2p", "gloo-staged"])


@pytest.mark.gpu
@pytest.mark.multirank
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_multi_gpu_script_on_gpus(tmp_path: Path) -> None:
    extra = ["--expert-bytes", str(1 << 20), "--dim", "1024", "--a2a-bytes", "65536"]
    report = run_script(tmp_path, "cuda", "p2p,ipc", extra)
    assert_report(report, ["p2p", "ipc"])
