"""LoadRecorder: background, atomic writes; the placement at close and at exit."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vllm.distributed.async_eplb.placement_files import (
    RECORDING_FORMAT,
    read_placement_file,
)
from vllm.distributed.async_eplb.recording import LoadRecorder

META = {"model": "toy", "num_ranks": 2}


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_windows_are_written_in_the_background_then_the_placement_at_close(
    tmp_path,
):
    path = tmp_path / "rec.npz"
    placement = torch.tensor([[0, 1, 2, 0], [2, 1, 0, 1]])
    recorder = LoadRecorder(path, META, placement=lambda: placement)
    recorder.add_window(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    _wait_for(lambda: recorder.writes == 1)
    source = read_placement_file(path)
    assert source.kind == "recording" and source.placement is None
    assert source.meta["format"] == RECORDING_FORMAT
    assert source.meta["model"] == "toy" and len(source.meta["window_times"]) == 1
    recorder.add_window(torch.tensor([[7, 8, 9], [1, 1, 1]]))
    recorder.close()
    recorder.close()  # idempotent
    recorder.add_window(torch.ones(2, 3, dtype=torch.int64))  # ignored once closed
    source = read_placement_file(path)
    assert source.load.tolist() == [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [1, 1, 1]]]
    assert source.placement.tolist() == placement.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["rec.npz"]  # no temp file left


def test_only_the_most_recent_windows_are_kept(tmp_path):
    recorder = LoadRecorder(tmp_path / "rec.npz", META, max_windows=3)
    for i in range(5):
        recorder.add_window(torch.full((1, 2), i))
    recorder.close()
    load = read_placement_file(tmp_path / "rec.npz").load
    assert load[:, 0, 0].tolist() == [2, 3, 4]


def test_nothing_is_written_without_a_window(tmp_path):
    LoadRecorder(tmp_path / "rec.npz", META, placement=lambda: torch.zeros(1)).close()
    assert not (tmp_path / "rec.npz").exists()


def test_missing_directory_names_the_variable(tmp_path):
    with pytest.raises(ValueError, match=r"VLLM_ASYNC_EPLB_RECORD=.*does not exist"):
        LoadRecorder(tmp_path / "no" / "rec.npz", META)


def test_a_failed_write_is_logged_and_serving_goes_on(tmp_path, caplog):
    path = tmp_path / "rec.npz"
    path.mkdir()  # os.replace onto a directory fails
    recorder = LoadRecorder(path, META)
    recorder.add_window(torch.ones(1, 2, dtype=torch.int64))
    recorder.close()
    assert "not written" in caplog.text
    assert recorder.writes == 0


def test_interpreter_exit_closes_a_pending_recording(tmp_path):
    """vLLM never calls shutdown(): the atexit hook writes the placement."""
    path = tmp_path / "rec.npz"
    script = f"""
import torch
from vllm.distributed.async_eplb.recording import LoadRecorder
recorder = LoadRecorder({str(path)!r}, {{"model": "toy"}},
                        placement=lambda: torch.tensor([[1, 0]]))
recorder.add_window(torch.tensor([[5, 6]]))
"""
    # timeout: importing vLLM alone can take a minute on a loaded machine
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    source = read_placement_file(path)
    assert source.placement.tolist() == [[1, 0]]
    assert np.array_equal(source.load, [[[5, 6]]])
