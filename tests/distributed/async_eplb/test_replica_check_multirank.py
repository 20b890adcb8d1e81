"""Stale replicas on 2 CPU ranks (gloo): found at add_model, healed, and right
across rebalances; a correct model is left untouched; the commit check sees
commits that moved no weights. The scenarios run in
``multirank/replica_check_toy.py``; here we check what each rank reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchrun_util import run_torchrun

SCRIPT = Path(__file__).parent / "multirank" / "replica_check_toy.py"
pytestmark = pytest.mark.multirank

# (layer, global slot, expert, primary slot) overwritten by the script.
STALE = [[0, 16, 0, 0], [1, 16, 0, 0], [1, 17, 1, 1]]
ROW_BYTES = 16 * 16 * 2 + 16 * 2 + 16  # toy expert: bf16 w, bf16 bias, u8 scale


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("replica_check")
    run_torchrun(SCRIPT, 2, ["--out-dir", str(out)], timeout=480)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_stale_replicas_are_found_healed_and_stay_right(results: list[dict]) -> None:
    for r in results:
        heal = r["heal"]
        assert heal["stale"] == STALE and heal["healed"], heal
        assert heal["stage_calls_in_add_model"] == 2  # the two layers with stale slots
        assert heal["mismatched_steps"] == 0 and heal["workspace_ok"], heal
        assert heal["rebalances"] >= 2 and heal["aborts"] == 0, heal
        assert heal["commit_slots_checked"] > 0 and heal["commit_mismatches"] == []
    # Slots 16 and 17 are rank 1's local slots 7 and 8; rank 0 only sends.
    assert results[0]["heal"]["changed_local_slots"] == []
    assert results[0]["heal"]["bytes_received"] == 0
    assert results[1]["heal"]["changed_local_slots"] == [[0, 7], [1, 7], [1, 8]]
    assert results[1]["heal"]["bytes_received"] == 3 * ROW_BYTES


def test_without_healing_the_warning_stays_and_outputs_are_wrong(
    results: list[dict],
) -> None:
    for r in results:
        no_heal = r["no-heal"]
        assert no_heal["stale"] == STALE and not no_heal["healed"]
        assert no_heal["stage_calls_in_add_model"] == 0
        assert no_heal["changed_local_slots"] == []
        assert no_heal["mismatched_steps"] > 0  # the stale slots do matter


def test_a_correct_model_is_left_untouched(results: list[dict]) -> None:
    for r in results:
        healthy = r["healthy"]
        assert healthy["stale"] == [] and not healthy["healed"]
        assert healthy["stage_calls_in_add_model"] == 0
        assert healthy["bytes_received"] == 0 and healthy["changed_local_slots"] == []
        assert healthy["mismatched_steps"] == 0 and healthy["workspace_ok"]
        assert healthy["rebalances"] >= 2 and healthy["commit_mismatches"] == []


def test_commit_check_reports_commits_that_moved_no_weights(
    results: list[dict],
) -> None:
    broken = [r["broken-commit"] for r in results]
    assert all(b["mismatched_steps"] > 0 for b in broken)
    assert sum(len(b["commit_mismatches"]) for b in broken) > 0
