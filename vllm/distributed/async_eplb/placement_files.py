"""Placement and load files: read them as data, check them against a model.

One reader serves the warm start (``VLLM_ASYNC_EPLB_INIT_PLACEMENT``), the
simulator's ``--trace`` and any later caller (the fleet mode). It accepts:

- our load recording (``.npz`` written by ``recording.py``): load windows
  ``[W, L, E]``, the model's name and geometry, and, when written at shutdown,
  the placement in force then;
- a plain load trace (``.npz`` / ``.npy`` of ``[W, L, E]`` arrays, the format
  the simulator already replays);
- SGLang's ``--init-expert-location`` files (``.json`` or ``.pt``): a dict
  with ``physical_to_logical_map`` ``[L, P]`` or ``logical_count`` ``[L, E]``
  or ``[N, L, E]`` (summed over N). Format as read in SGLang's
  ``python/sglang/srt/eplb/expert_location.py``
  (``compute_initial_expert_location_metadata``, ``init_by_mapping``,
  ``init_by_eplb``) and ``expert_distribution.py`` (the ``stat`` recorder dumps
  ``{"rank", "logical_count", "average_utilization_rate_over_window"}`` with
  ``torch.save``). SGLang counts every decoder layer, dense ones included,
  so a ``logical_count`` may carry layers without any load (dense layers).

Files are data, never code: ``.pt`` through ``torch.load(weights_only=True)``
and then only plain tensors, lists, dicts, numbers and strings; ``.npz`` /
``.npy`` with ``allow_pickle=False`` after reading each array's header (shape
and dtype) and bounding its size; JSON after a size check, with shapes checked
before any array is allocated. Every refusal is a ``PlacementFileError`` (a
``ValueError``) of one line that names the file. Pure: no process group.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "META_KEY",
    "RECORDING_FORMAT",
    "Geometry",
    "PlacementFileError",
    "PlacementSource",
    "check_load",
    "check_placement",
    "read_load_trace",
    "read_placement_file",
    "warm_start_input",
]

RECORDING_FORMAT = "async_eplb.load_recording"
META_KEY = "async_eplb_meta"
MAX_FILE_BYTES = 1 << 30
"""Largest file read (1 GiB): a DeepSeek-V3 recording of 64 windows is 7.6 MB."""
MAX_JSON_BYTES = 1 << 26
"""Largest JSON read (64 MiB): parsed JSON takes about ten times its size."""
MAX_ELEMENTS = 1 << 27
"""Most numbers one file may hold (134 M), checked before allocating them."""
_MAX_DEPTH = 8
_PLACEMENT_KEY = "physical_to_logical_map"
_LOAD_KEY = "logical_count"


class PlacementFileError(ValueError):
    """A placement or load file refused; the message is one line naming it."""


@dataclass(frozen=True)
class Geometry:
    """What a file must fit: the model and the deployment it is applied to."""

    model_name: str
    num_layers: int
    num_logical_experts: int
    num_physical_experts: int
    num_ranks: int


@dataclass(frozen=True)
class PlacementSource:
    """What a file gives: load to place from, a placement to take as given, or both.

    ``load`` is ``[W, L, E]`` (windows of per-expert load), ``placement``
    ``[L, P]``; ``meta`` is what the file says about itself (our recordings:
    model name and geometry; SGLang's and plain traces: nothing).
    """

    path: str
    kind: str
    load: np.ndarray | None = None
    placement: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _fail(path: Path | str, what: str) -> PlacementFileError:
    line = " ".join(str(what).split())  # one line, whatever the cause said
    return PlacementFileError(f"{path} {line}")


# -- readers, one per container ------------------------------------------------
def _check_size(path: Path) -> None:
    if not path.is_file():
        raise _fail(path, "does not exist")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _fail(path, f"is {size} bytes, more than the {MAX_FILE_BYTES} read")


def _check_header(path: Path, name: str, shape: tuple[int, ...], dtype: Any) -> None:
    """Refuse an array from its header, before it is read into memory."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise _fail(path, f"holds Python objects in array {name!r} (pickled data)")
    if dtype.kind not in "biufU":
        raise _fail(path, f"has array {name!r} of dtype {dtype}, not numbers")
    if math.prod(shape) > MAX_ELEMENTS:
        raise _fail(path, f"has array {name!r} of shape {shape}: too large")


def _npy_header(path: Path, handle: Any, name: str) -> None:
    major, _ = np.lib.format.read_magic(handle)
    read = {
        1: np.lib.format.read_array_header_1_0,
        2: np.lib.format.read_array_header_2_0,
    }.get(major)
    if read is None:
        raise _fail(path, f"has array {name!r} in .npy format version {major}")
    shape, _, dtype = read(handle)
    _check_header(path, name, tuple(shape), dtype)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size > MAX_FILE_BYTES:
                    raise _fail(path, f"has member {info.filename!r}: too large")
                with archive.open(info) as handle:
                    _npy_header(path, handle, info.filename)
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except PlacementFileError:
        raise
    except Exception as exc:  # a damaged archive: say what numpy said
        raise _fail(path, f"is not a readable .npz ({exc})") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        with path.open("rb") as handle:
            _npy_header(path, handle, path.name)
        return np.load(path, allow_pickle=False)
    except PlacementFileError:
        raise
    except Exception as exc:
        raise _fail(path, f"is not a readable .npy ({exc})") from None


def _plain(path: Path, value: Any, where: str, depth: int = 0) -> None:
    """Only tensors, lists, dicts, numbers and strings: no other objects."""
    if depth > _MAX_DEPTH:
        raise _fail(path, f"is refused: {where} is nested over {_MAX_DEPTH} deep")
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_complex():
            raise _fail(
                path, f"is refused: {where} is a {value.layout} {value.dtype} tensor"
            )
        if value.numel() > MAX_ELEMENTS:
            raise _fail(
                path, f"is refused: {where} of shape {tuple(value.shape)}: too large"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(path, f"is refused: {where} has a {type(key).__name__} key")
            _plain(path, item, f"{where}[{key!r}]", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _plain(path, item, f"{where}[{i}]", depth + 1)
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        raise _fail(
            path, f"is refused: {where} is a {type(value).__name__}, not plain data"
        )


def _read_pt(path: Path) -> Any:
    try:
        # weights_only: torch's restricted unpickler, which refuses any global
        # (function, class) beyond tensors and containers without calling it.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise _fail(
            path, f"is refused by torch.load(weights_only=True): {first}"
        ) from None
    _plain(path, data, "the file")
    return data


def _json_shape(path: Path, value: Any, where: str, depth: int = 0) -> tuple[int, ...]:
    """Shape of a rectangular nested list of numbers, checked element by element."""
    if depth > 3:
        raise _fail(path, f"is refused: {where} is nested deeper than 3 dimensions")
    if isinstance(value, bool) or not isinstance(value, (list, int, float)):
        raise _fail(
            path, f"is refused: {where} is a {type(value).__name__}, not a number"
        )
    if not isinstance(value, list):
        return ()
    if not value:
        return (0,)
    shapes = {
        _json_shape(path, item, f"{where}[{i}]", depth + 1)
        for i, item in enumerate(value)
    }
    if len(shapes) != 1:
        raise _fail(
            path, f"is refused: {where} is ragged (rows of shapes {sorted(shapes)})"
        )
    return (len(value), *shapes.pop())


def _read_json(path: Path) -> dict[str, Any]:
    def refuse_constant(name: str) -> None:
        raise _fail(path, f"holds {name}, not a finite number")

    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise _fail(path, f"is {size} bytes, more than the {MAX_JSON_BYTES} read")
    try:
        data = json.loads(path.read_bytes(), parse_constant=refuse_constant)
    except PlacementFileError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _fail(path, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(path, f"holds a {type(data).__name__}, expected a JSON object")
    for key in (_PLACEMENT_KEY, _LOAD_KEY):
        if key in data:
            _json_shape(path, data[key], key)  # before np.asarray allocates
    return data


# -- interpretation ----------------------------------------------------------
def _array(path: Path, value: Any, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested lists from a .pt
        raise _fail(path, f"is refused: {name} is not an array ({exc})") from None
    if array.dtype.kind not in "iuf" or array.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise _fail(
            path,
            f"is refused: {name} must be a {want} array of numbers, got shape "
            f"{array.shape} of {array.dtype}",
        )
    if not np.isfinite(array).all():
        raise _fail(path, f"has NaN or infinite values in {name}")
    return array


def _from_mapping(path: Path, data: dict[str, Any], kind: str) -> PlacementSource:
    """SGLang's dict: ``physical_to_logical_map`` first, as SGLang reads it."""
    if _PLACEMENT_KEY in data:
        placement = _array(path, data[_PLACEMENT_KEY], _PLACEMENT_KEY, (2,))
        meta = {k: data[k] for k in ("num_ranks",) if k in data}
        ranks = meta.get("num_ranks")
        if ranks is not None and (
            isinstance(ranks, bool) or not isinstance(ranks, int)
        ):
            raise _fail(path, f"is refused: num_ranks={ranks!r} is not an integer")
        return PlacementSource(str(path), kind, placement=placement, meta=meta)
    if _LOAD_KEY in data:
        load = _array(path, data[_LOAD_KEY], _LOAD_KEY, (2, 3))
        load = load[None] if load.ndim == 2 else load
        return PlacementSource(str(path), kind, load=load)
    raise _fail(
        path,
        f"has neither {_PLACEMENT_KEY!r} nor {_LOAD_KEY!r} (keys: {sorted(data)})",
    )


def _from_npz(path: Path, arrays: dict[str, np.ndarray]) -> PlacementSource:
    if not arrays:
        raise _fail(path, "holds no arrays")
    if META_KEY in arrays:
        return _recording(path, arrays)
    if _PLACEMENT_KEY in arrays or _LOAD_KEY in arrays:
        return _from_mapping(path, arrays, "npz")
    loads = [_array(path, a, f"array {n!r}", (2, 3)) for n, a in arrays.items()]
    loads = [a[:, None, :] if a.ndim == 2 else a for a in loads]
    if len({a.shape[1:] for a in loads}) != 1:
        shapes = [a.shape for a in loads]
        raise _fail(
            path, f"must hold [windows, layers, experts] of one geometry, got {shapes}"
        )
    return PlacementSource(str(path), "trace", load=np.concatenate(loads))


def _recording(path: Path, arrays: dict[str, np.ndarray]) -> PlacementSource:
    raw = arrays[META_KEY]
    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise _fail(path, f"is refused: {META_KEY} must be a JSON string")
    try:
        meta = json.loads(str(raw))
    except ValueError as exc:
        raise _fail(path, f"is refused: {META_KEY} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != RECORDING_FORMAT:
        raise _fail(
            path, f"is refused: {META_KEY} does not describe a {RECORDING_FORMAT}"
        )
    if "load" not in arrays:
        raise _fail(path, "is a recording without a 'load' array")
    load = _array(path, arrays["load"], "load", (3,))
    placement = None
    if "placement" in arrays:
        placement = _array(path, arrays["placement"], "placement", (2,))
    return PlacementSource(str(path), "recording", load, placement, meta)


def read_placement_file(path: str | Path) -> PlacementSource:
    """Read any accepted file (see the module docstring); nothing is applied."""
    path = Path(path)
    _check_size(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _from_npz(path, _read_npz(path))
    if suffix == ".npy":
        load = _array(path, _read_npy(path), "the array", (2, 3))
        load = load[:, None, :] if load.ndim == 2 else load
        return PlacementSource(str(path), "trace", load=load)
    if suffix in (".pt", ".pth"):
        data = _read_pt(path)
        if not isinstance(data, dict):
            raise _fail(path, f"holds a {type(data).__name__}, expected a dict")
        return _from_mapping(path, data, "pt")
    if suffix == ".json":
        return _from_mapping(path, _read_json(path), "json")
    raise _fail(path, "must be a .npz, .npy, .pt or .json file")


def _drop_dense_layers(load: np.ndarray) -> np.ndarray:
    """Drop layers without any load: SGLang's dense layers, never routed."""
    loaded = load.sum(axis=(0, 2)) > 0
    return load[:, loaded] if loaded.any() else load


def read_load_trace(path: str | Path) -> np.ndarray:
    """A load trace ``[W, L, E]`` (float64) for replay, from any file with load.

    Leading layers with no load at all are dropped (SGLang's dense layers).
    """
    source = read_placement_file(path)
    if source.load is None or source.load.shape[0] == 0:
        raise _fail(path, f"holds no load to replay (a {source.kind} placement only)")
    trace = _drop_dense_layers(source.load.astype(np.float64))
    if (trace < 0).any():
        raise _fail(path, "has negative loads")
    if (trace.sum(axis=-1) <= 0).any():
        raise _fail(path, "has a window whose layer has no load")
    return trace


# -- checks against the model ---------------------------------------------------
def _check_model_name(source: PlacementSource, geometry: Geometry) -> None:
    recorded = source.meta.get("model")
    if recorded is not None and recorded != geometry.model_name:
        raise _fail(
            source.path,
            f"was recorded for model {recorded!r}, this model is "
            f"{geometry.model_name!r}",
        )


def check_placement(source: PlacementSource, geometry: Geometry) -> torch.Tensor:
    """``source.placement`` as ``[L, P]`` int64, refused unless it fits ``geometry``."""
    from vllm.distributed.async_eplb.maps import validate_placement

    _check_model_name(source, geometry)
    placement = source.placement
    assert placement is not None
    layers, slots = placement.shape
    g = geometry
    if layers != g.num_layers:
        hint = " (SGLang counts dense layers too: keep the MoE layers' rows)"
        raise _fail(
            source.path,
            f"has {layers} layers, the model has {g.num_layers}"
            + (hint if layers > g.num_layers else ""),
        )
    if slots != g.num_physical_experts:
        raise _fail(
            source.path,
            f"has {slots} physical slots per layer, the model has "
            f"{g.num_physical_experts}",
        )
    ranks = source.meta.get("num_ranks")
    if ranks is not None and ranks != g.num_ranks:
        raise _fail(
            source.path,
            f"is a placement for {ranks} EP ranks, this deployment has {g.num_ranks}",
        )
    if placement.dtype.kind == "f" and (placement != np.round(placement)).any():
        raise _fail(source.path, "holds non-integer expert ids")
    tensor = torch.from_numpy(placement.astype(np.int64))
    try:
        validate_placement(tensor, g.num_logical_experts, g.num_ranks)
    except ValueError as exc:  # names the expert, the slot, the layer
        raise _fail(source.path, f"is refused: {exc}") from None
    return tensor


def check_load(source: PlacementSource, geometry: Geometry) -> torch.Tensor:
    """``source.load`` summed over windows, ``[L, E]``, refused unless it fits."""
    _check_model_name(source, geometry)
    load = source.load
    if load is None or load.shape[0] == 0:
        raise _fail(source.path, "holds no load windows")
    g = geometry
    if load.shape[1] > g.num_layers:
        load = _drop_dense_layers(load)
    layers, experts = load.shape[1:]
    if layers != g.num_layers:
        raise _fail(source.path, f"has {layers} layers, the model has {g.num_layers}")
    if experts != g.num_logical_experts:
        raise _fail(
            source.path,
            f"has {experts} experts per layer, the model has {g.num_logical_experts}",
        )
    if (load < 0).any():
        raise _fail(source.path, "has negative loads")
    return torch.from_numpy(load.astype(np.float64).sum(axis=0))


def warm_start_input(
    source: PlacementSource, geometry: Geometry
) -> tuple[str, torch.Tensor]:
    """What a warm start uses: ``("placement", [L, P])`` or ``("load", [L, E])``.

    An explicit placement is taken as given, and must fit. A recording's
    placement is taken only where it was made for this very geometry (same
    slots and EP ranks); otherwise its load is placed anew, as at another
    scale.
    """
    _check_model_name(source, geometry)
    if source.placement is not None:
        if source.kind != "recording":
            return "placement", check_placement(source, geometry)
        same = source.meta.get("num_ranks") == geometry.num_ranks and tuple(
            source.placement.shape
        ) == (geometry.num_layers, geometry.num_physical_experts)
        if same:
            return "placement", check_placement(source, geometry)
    return "load", check_load(source, geometry)
