"""Record a run, warm-start the next one from it: gloo ranks, the toy MoE.

The torchrun script checks every step's output bit for bit against the unmoved
model and the workspace against the maps; here we compare the runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrun_util import run_torchrun

from vllm.distributed.async_eplb.placement_files import Geometry, read_placement_file
from vllm.distributed.async_eplb.recording import write_recording
from vllm.distributed.async_eplb.warm_start import plan_warm_start

SCRIPT = Path(__file__).parent / "multirank" / "warm_start_main.py"
pytestmark = pytest.mark.multirank


def _run(world: int, out: Path, *args: str) -> list[dict]:
    out.mkdir()
    run_torchrun(SCRIPT, world, ["--out-dir", str(out), *args], timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_second_run_starts_where_the_recorded_run_ended(tmp_path, world):
    recording = tmp_path / "load.npz"
    # 70 steps (a rebalance every 10): at least two load votes even when a
    # loaded machine stretches an async round over many steps (45 steps gave
    # exactly 2, once fewer)
    first = _run(world, tmp_path / "first", "--record", str(recording), "--steps", "70")
    assert first[0]["load_votes"] >= 2 and first[0]["aborts"] == 0
    source = read_placement_file(recording)
    assert source.meta["model"] == "toy-moe" and source.meta["num_ranks"] == world
    assert source.load.shape[0] >= first[0]["load_votes"]
    assert source.placement.tolist() == first[0]["final_phy2log"]

    second = _run(world, tmp_path / "second", "--init", str(recording), "--steps", "4")
    for before, after in zip(first, second, strict=True):
        assert after["start_phy2log"] == before["final_phy2log"]
        assert after["start_balancedness"] == before["reached_balancedness"]
        assert after["start_balancedness"] > after["round_robin_balancedness"] + 0.05
        assert after["first_step_balancedness"] > after["round_robin_first_step"]
        assert after["layers_committed"] > 0  # moved by the warm start
    assert len({json.dumps(r["start_phy2log"]) for r in second}) == 1


def test_recording_of_another_scale_is_placed_anew_and_other_models_refused(
    tmp_path,
):
    """A 4-rank recording on 2 ranks: its load is placed by the policy. A
    file recorded for another model: refused on every rank, model untouched."""
    rng = np.random.default_rng(0)
    load = rng.zipf(1.5, size=(3, 3, 16)).clip(max=500)
    meta = {"model": "toy-moe", "num_ranks": 4}
    placement = np.tile(np.arange(20) % 16, (3, 1))
    write_recording(tmp_path / "four.npz", load, meta, placement)
    runs = _run(
        2, tmp_path / "scaled", "--init", str(tmp_path / "four.npz"), "--steps", "3"
    )
    expected = plan_warm_start(
        str(tmp_path / "four.npz"),
        Geometry("toy-moe", 3, 16, 20, 2),
        torch.tensor(placement),
        num_groups=1,
        ranks_per_node=2,
        policy="default",
    ).target.tolist()
    assert expected != placement.tolist()
    for r in runs:
        assert r["start_phy2log"] == expected
        assert r["layers_committed"] > 0

    write_recording(tmp_path / "other.npz", load, {**meta, "model": "other"})
    refused = _run(
        2,
        tmp_path / "refused",
        "--init",
        str(tmp_path / "other.npz"),
        "--expect-refusal",
    )
    for r in refused:
        assert "was recorded for model 'other', this model is 'toy-moe'" in r["refused"]
        assert "\n" not in r["refused"]
