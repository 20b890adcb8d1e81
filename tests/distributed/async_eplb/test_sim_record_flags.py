"""The simulator's --record, --init-placement and --trace with our recordings."""

from __future__ import annotations

import json

import numpy as np

from vllm.distributed.async_eplb.recording import write_recording
from vllm.distributed.async_eplb.simulation.cli import _config, build_parser, main
from vllm.distributed.async_eplb.simulation.runner import SimConfig


def test_flags_reach_the_eplb_knobs(tmp_path):
    args = build_parser().parse_args(
        ["--record", str(tmp_path / "r.npz"), "--init-placement", "p.json"]
    )
    knobs = _config(args).eplb_knobs()
    assert knobs.record == str(tmp_path / "r.npz")
    assert knobs.init_placement == "p.json"


def test_environment_applies_when_the_flags_are_absent(monkeypatch):
    monkeypatch.setenv("VLLM_ASYNC_EPLB_RECORD", "/tmp/env.npz")
    assert SimConfig().eplb_knobs().record == "/tmp/env.npz"


def test_a_recording_replays_as_a_trace(tmp_path):
    path = tmp_path / "rec.npz"
    load = np.random.default_rng(0).integers(1, 50, (5, 3, 64))
    write_recording(path, load, {"model": "toy-deepseek-v2-lite", "num_ranks": 4})
    source = SimConfig(trace=str(path), layers=3).make_load()
    assert "5 windows x 3 layers x 64 experts" in source.description


def test_bad_record_or_init_file_is_one_line_before_any_rank_starts(tmp_path, capsys):
    missing_dir = str(tmp_path / "no" / "r.npz")
    assert main(["--record", missing_dir]) == 2
    assert "its directory does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"logical_count": [[1, 2], [3]]}))
    assert main(["--init-placement", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.json is refused: logical_count is ragged" in err
    assert err.count("\n") == 1
