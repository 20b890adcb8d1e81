"""EplbState on 4 CPU ranks (gloo) driving the toy MoE, as vLLM's runner would.

The per-step checks (output bit-exact against the unmoved model at every step,
rebalances included; ranks agree on maps and commit steps; workspace matches
the maps) run inside the torchrun script and fail it; here we check the
summary each rank prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchrun_util import run_torchrun

SCRIPT = Path(__file__).parent / "multirank" / "eplb_state_toy.py"
pytestmark = pytest.mark.multirank


def _results(args: list[str], out_dir: Path) -> list[dict]:
    run_torchrun(SCRIPT, 4, [*args, "--out-dir", str(out_dir)], timeout=240)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(4)]


def test_async_rebalances_layer_by_layer_without_blocking_collectives(
    tmp_path: Path,
) -> None:
    results = _results(["--mode", "async", "--steps", "60"], tmp_path)
    for r in results:
        assert r["blocking_in_step"] == 0
        assert r["rebalances"] >= 2 and r["aborts"] == 0
        assert r["converged"] == r["rebalances"]
        # at most one layer per step, and steps with a partial rebalance seen
        assert all(n == 1 for _, n in r["commit_log"])
        assert r["mid_rebalance_steps"] > 0
        assert r["late_balancedness"] > r["early_balancedness"] + 0.1
        assert r["bytes_moved"] > 0
    assert len({json.dumps(r["commit_log"]) for r in results}) == 1


def test_sync_mode_moves_all_layers_at_once(tmp_path: Path) -> None:
    results = _results(["--mode", "sync", "--steps", "25"], tmp_path)
    for r in results:
        assert r["rebalances"] >= 2
        assert any(n > 1 for _, n in r["commit_log"])
        assert r["late_balancedness"] > r["early_balancedness"] + 0.1


def test_failures_abort_everywhere_at_once_then_later_intervals_succeed(
    tmp_path: Path,
) -> None:
    """Rank 1 fails to plan the first rebalance (nothing staged yet); rank 2's
    transport fails mid-staging in the next one, leaving its peers waiting:
    every rank aborts at the same step, recovers onto a spare staging group,
    and later rebalances complete. Outputs stay exact throughout."""
    args = [
        "--mode",
        "async",
        "--steps",
        "400",
        "--timeout",
        "2",
        "--fail-planning-rank",
        "1",
        "--fail-staging-rank",
        "2",
    ]
    results = _results(args, tmp_path)
    for r in results:
        assert r["aborts"] == 2
        assert r["rebalances"] >= 2
        assert r["converged"] == r["rebalances"]
        assert r["blocking_in_step"] == 0
    assert "injected staging failure" in results[2]["abort_cause"]
    assert results[0]["abort_cause"] == "1 other rank(s) failed"
    assert len({json.dumps(r["commit_log"]) for r in results}) == 1


TWO_MODELS = Path(__file__).parent / "multirank" / "eplb_state_two_models.py"


@pytest.mark.parametrize("ranks", [2, 4])
def test_target_and_moe_drafter_share_one_eplb_state_bit_exact(
    ranks: int, tmp_path: Path
) -> None:
    """vLLM registers an MoE drafter with the target's ``EplbState``: both
    rebalance several times, every output of both bit-exact at every step."""
    run_torchrun(TWO_MODELS, ranks, ["--out-dir", str(tmp_path)], timeout=600)
    results = [
        json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)
    ]
    for r in results:
        assert r["mismatches"] == {"target": 0, "drafter": 0}, r
        assert r["workspace_ok"] == {"target": True, "drafter": True}, r
        assert r["ranks_agree"] and r["aborts"] == 0, r
        assert min(r["rebalanced"].values()) >= 3, r
