"""vLLM's real DeepSeek-V3 + DeepSeek MTP on 2 gloo ranks: the drafter's
redundant slots, which vLLM's MTP loader never fills, are found at
``add_model`` (slots 16 and 17), healed, and every replica matches its
primary across several rebalances; with healing off they stay wrong and
routed tokens reach them. The per-rank driver is
``multirank/replica_check_real.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchrun_util import run_torchrun

SCRIPT = Path(__file__).parent / "multirank" / "replica_check_real.py"
pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def results() -> dict[bool, dict]:
    pytest.importorskip("vllm.config")
    proc = run_torchrun(SCRIPT, 2, ["--steps", "72"], timeout=1800)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            out[result["heal"]] = result
    assert set(out) == {True, False}, proc.stdout[-4000:]
    return out


def _by_class(result: dict, field: str) -> dict[str, object]:
    """``result[field]`` keyed by model class (vLLM names models by path)."""
    values = list(result[field].values())
    return dict(zip(result["classes"], values, strict=True))


def test_drafter_slots_16_17_found_healed_and_right_across_rebalances(
    results: dict[bool, dict],
) -> None:
    heal = results[True]
    assert heal["classes"] == ["DeepSeekMTP", "DeepseekV3ForCausalLM"]
    # The check's verdict on the weights as vLLM's loaders left them.
    assert heal["stale_before_add_model"] == {
        "DeepSeekMTP": [[0, 16], [0, 17]],
        "DeepseekV3ForCausalLM": [],
    }
    assert _by_class(heal, "reported") == {
        "DeepSeekMTP": [[0, 16], [0, 17]],
        "DeepseekV3ForCausalLM": [],
    }
    assert _by_class(heal, "healed") == {
        "DeepSeekMTP": True,
        "DeepseekV3ForCausalLM": False,
    }
    assert heal["rebalances"] >= 3 and heal["aborts"] == 0, heal
    assert heal["wrong_replica_slot_steps"] == 0, heal
    assert heal["wrong_routed_slot_steps"] == 0, heal
    assert heal["commit_slots_checked"] > 0 and heal["commit_mismatches"] == 0


def test_without_healing_tokens_reach_the_stale_slots(
    results: dict[bool, dict],
) -> None:
    no_heal = results[False]
    assert _by_class(no_heal, "reported")["DeepSeekMTP"] == [[0, 16], [0, 17]]
    assert _by_class(no_heal, "healed")["DeepSeekMTP"] is False
    assert no_heal["wrong_replica_slot_steps"] > 0
    assert no_heal["wrong_routed_slot_steps"] > 0
