"""Placement and load files: SGLang's formats, our recordings, and every refusal.

SGLang's files are written here by hand from the format as SGLang reads it
(``expert_location.py``: a dict with ``physical_to_logical_map [L, P]`` or
``logical_count [L, E]`` / ``[N, L, E]``, JSON or ``torch.save``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm.distributed.async_eplb.placement_files import (
    META_KEY,
    Geometry,
    PlacementFileError,
    check_load,
    check_placement,
    read_load_trace,
    read_placement_file,
    warm_start_input,
)
from vllm.distributed.async_eplb.recording import write_recording
from vllm.distributed.async_eplb.warm_start import plan_warm_start

LAYERS, EXPERTS, SLOTS, RANKS = 2, 4, 6, 2
GEOMETRY = Geometry("toy", LAYERS, EXPERTS, SLOTS, RANKS)
PLACEMENT = [[0, 1, 2, 3, 3, 0], [3, 2, 1, 0, 1, 1]]
INITIAL = torch.tensor([[0, 1, 2, 3, 0, 1]] * LAYERS)


def _json(tmp_path: Path, data: object, name: str = "f.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_sglang_json_physical_to_logical_map_is_taken_as_given(tmp_path):
    path = _json(tmp_path, {"physical_to_logical_map": PLACEMENT})
    kind, value = warm_start_input(read_placement_file(path), GEOMETRY)
    assert kind == "placement"
    assert value.tolist() == PLACEMENT and value.dtype == torch.int64


@pytest.mark.parametrize("windows", [None, 3])
def test_sglang_json_logical_count_is_summed_over_passes(tmp_path, windows):
    count = np.arange(LAYERS * EXPERTS).reshape(LAYERS, EXPERTS) + 1
    data = count if windows is None else np.stack([count] * windows)
    path = _json(tmp_path, {"logical_count": data.tolist()})
    kind, value = warm_start_input(read_placement_file(path), GEOMETRY)
    assert kind == "load"
    assert value.tolist() == (count * (windows or 1)).tolist()


def test_sglang_pt_stat_dump_with_dense_layers(tmp_path):
    """The stat recorder's dump: rank, logical_count [N, all layers, E], rate.

    SGLang counts dense layers too (leading ones in DeepSeek, interleaved in
    some models): layers without load are dropped when the file has more
    layers than the model has MoE layers.
    """
    moe = torch.randint(1, 9, (5, LAYERS, EXPERTS), dtype=torch.int32)
    dense = torch.zeros(5, 1, EXPERTS, dtype=torch.int32)
    count = torch.cat([dense, dense, moe[:, :1], dense, moe[:, 1:]], dim=1)
    path = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save(
        {
            "rank": 0,
            "logical_count": count,
            "average_utilization_rate_over_window": None,
        },
        path,
    )
    source = read_placement_file(path)
    assert check_load(source, GEOMETRY).tolist() == moe.sum(0).double().tolist()
    assert read_load_trace(path).shape == (5, LAYERS, EXPERTS)


def test_sglang_pt_physical_to_logical_map_tensor(tmp_path):
    path = tmp_path / "p.pt"
    torch.save({"physical_to_logical_map": torch.tensor(PLACEMENT)}, path)
    assert check_placement(read_placement_file(path), GEOMETRY).tolist() == PLACEMENT


class _Trap:
    """Unpickling this calls ``Path.touch(marker)``: code, not data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pt_with_a_pickled_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"logical_count": [[1.0] * EXPERTS] * LAYERS, "x": _Trap(marker)}, path)
    with pytest.raises(PlacementFileError, match=r"evil\.pt is refused by torch") as e:
        read_placement_file(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    # The trap is real: an unrestricted load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_npz_with_an_object_array_is_refused_from_its_header(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, load=np.array([{"a": 1}], dtype=object))
    with pytest.raises(PlacementFileError, match="Python objects"):
        read_placement_file(path)


def test_npy_claiming_a_huge_shape_is_refused_before_allocation(tmp_path):
    path = tmp_path / "huge.npy"
    header = {"descr": "<f8", "fortran_order": False, "shape": (1 << 20, 1 << 10, 8)}
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)  # far fewer bytes than the header claims
    with pytest.raises(PlacementFileError, match="too large"):
        read_placement_file(path)


def _recording(path: Path, ranks: int = RANKS, model: str = "toy") -> Path:
    meta = {"model": model, "num_ranks": ranks, "num_layers": LAYERS}
    load = np.random.default_rng(0).integers(1, 50, (3, LAYERS, EXPERTS))
    write_recording(path, load, meta, np.array(PLACEMENT))
    return path


def test_recording_placement_is_taken_only_for_the_same_ranks(tmp_path):
    path = _recording(tmp_path / "rec.npz")
    kind, value = warm_start_input(read_placement_file(path), GEOMETRY)
    assert kind == "placement" and value.tolist() == PLACEMENT
    other = Geometry("toy", LAYERS, EXPERTS, SLOTS, 3)  # another scale: re-placed
    kind, value = warm_start_input(read_placement_file(path), other)
    assert kind == "load" and value.shape == (LAYERS, EXPERTS)
    assert read_load_trace(path).shape == (3, LAYERS, EXPERTS)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_files_are_placed_by_the_policy_from_the_initial_placement(tmp_path):
    count = [[100, 1, 1, 1], [1, 1, 1, 100]]
    path = _json(tmp_path, {"logical_count": count})
    start = plan_warm_start(
        str(path), GEOMETRY, INITIAL, num_groups=1, ranks_per_node=2, policy="default"
    )
    assert start.target.shape == (LAYERS, SLOTS)
    # The hot expert gets the most replicas, in every layer.
    for layer, hot in ((0, 0), (1, 3)):
        counts = torch.bincount(start.target[layer], minlength=EXPERTS)
        assert int(counts.argmax()) == hot
    assert start.changed_layers and "policy default" in start.description


def _bad_files(tmp_path: Path) -> list[tuple[Path, str]]:
    good_ranks = {"physical_to_logical_map": PLACEMENT}
    cases: list[tuple[Path, str]] = [
        (
            _json(tmp_path, {"physical_to_logical_map": PLACEMENT * 2}, "l4.json"),
            "has 4 layers, the model has 2 (SGLang counts dense layers too",
        ),
        (
            _json(tmp_path, {"physical_to_logical_map": PLACEMENT[:1]}, "l.json"),
            "has 1 layers, the model has 2",
        ),
        (
            _json(
                tmp_path,
                {"physical_to_logical_map": [r[:4] for r in PLACEMENT]},
                "s.json",
            ),
            "has 4 physical slots per layer, the model has 6",
        ),
        (
            _json(tmp_path, {"logical_count": [[1] * 5] * LAYERS}, "e.json"),
            "has 5 experts per layer, the model has 4",
        ),
        (
            _json(tmp_path, {**good_ranks, "num_ranks": 3}, "r.json"),
            "placement for 3 EP ranks, this deployment has 2",
        ),
        (
            _json(
                tmp_path,
                {"physical_to_logical_map": [[0, 1, 2, 2, 2, 0]] * 2},
                "m.json",
            ),
            "logical expert 3 has no physical replica",
        ),
        (
            _json(
                tmp_path,
                {"physical_to_logical_map": [[0, 1, 2, 3, 9, 0]] * 2},
                "i.json",
            ),
            "is not a logical expert id",
        ),
        (
            _json(tmp_path, {"logical_count": [[1, 2, 3, 4], [1, 2]]}, "rag.json"),
            "ragged",
        ),
        (
            _json(tmp_path, {"logical_count": [["a"] * 4] * 2}, "str.json"),
            "is a str, not a number",
        ),
        (
            _json(tmp_path, {"logical_count": [[1, 2, 3, -4]] * 2}, "neg.json"),
            "negative",
        ),
        (_json(tmp_path, [1, 2], "list.json"), "expected a JSON object"),
        (_json(tmp_path, {"other": 1}, "key.json"), "has neither"),
        (
            _recording(tmp_path / "other.npz", model="another-model"),
            "was recorded for model 'another-model', this model is 'toy'",
        ),
    ]
    deep = _json(tmp_path, {"logical_count": [[[[[1]]]]]}, "deep.json")
    cases.append((deep, "nested deeper than 3"))
    nan = tmp_path / "nan.json"
    nan.write_text('{"logical_count": [[NaN, 1, 1, 1], [1, 1, 1, 1]]}')
    cases.append((nan, "NaN"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"logical_count": [[1, 2')
    cases.append((broken, "not valid JSON"))
    text = tmp_path / "p.yaml"
    text.write_text("a: 1")
    cases.append((text, "must be a .npz, .npy, .pt or .json"))
    pt_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], pt_list)
    cases.append((pt_list, "expected a dict"))
    meta = tmp_path / "meta.npz"
    np.savez(meta, **{META_KEY: np.array("{not json"), "load": np.ones((1, 2, 4))})
    cases.append((meta, "is not valid JSON"))
    zipped = tmp_path / "broken.npz"
    zipped.write_bytes(b"PK\x03\x04 not a zip")
    cases.append((zipped, "not a readable .npz"))
    cases.append((tmp_path / "missing.json", "does not exist"))
    return cases


def test_every_malformed_file_is_refused_with_one_line_naming_it(tmp_path):
    for path, expected in _bad_files(tmp_path):
        with pytest.raises(PlacementFileError) as info:
            source = read_placement_file(path)
            warm_start_input(source, GEOMETRY)
        message = str(info.value)
        assert "\n" not in message, message
        assert message.startswith(str(path)), message
        assert expected in message, (expected, message)


def test_plan_warm_start_refuses_before_planning(tmp_path):
    path = _json(tmp_path, {"physical_to_logical_map": PLACEMENT[:1]})
    with pytest.raises(PlacementFileError, match="has 1 layers"):
        plan_warm_start(
            str(path),
            GEOMETRY,
            INITIAL,
            num_groups=1,
            ranks_per_node=2,
            policy="default",
        )


def test_oversized_file_is_refused_by_its_size(tmp_path, monkeypatch):
    from vllm.distributed.async_eplb import placement_files

    path = _json(tmp_path, {"logical_count": [[1] * EXPERTS] * LAYERS})
    monkeypatch.setattr(placement_files, "MAX_FILE_BYTES", os.path.getsize(path) - 1)
    with pytest.raises(PlacementFileError, match="bytes, more than"):
        read_placement_file(path)
