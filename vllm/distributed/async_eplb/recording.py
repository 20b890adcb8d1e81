"""Record a deployment's expert load, in the trace format the simulator replays.

``VLLM_ASYNC_EPLB_RECORD=PATH``: at every rebalance (every load vote, skipped
rebalances included) EP rank 0 adds the load window it already holds, summed
over every EP rank by the vote, to an ``.npz``:

- ``load``: int64 ``[windows, layers, experts]``, the last ``MAX_WINDOWS``;
- ``async_eplb_meta``: a JSON string (model name, geometry, EPLB settings, wall
  time of each window), stored as a numpy string, so the file opens with
  ``allow_pickle=False``;
- ``placement``: int64 ``[layers, slots]``, the placement in force when the
  recording was closed (at ``shutdown()``, or at interpreter exit: vLLM never
  calls ``shutdown()``, so an ``atexit`` hook closes a pending recording).

The caller (the planner thread in async mode) only appends references under a
lock; a daemon thread converts and writes, each time to a temporary file in the
same directory that then replaces ``PATH`` (``os.replace``): a reader never
sees half a file. The load
since the last rebalance is not in the file: summing it over ranks would need a
collective, which neither ``shutdown()`` nor interpreter exit can run safely.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm.distributed.async_eplb.placement_files import META_KEY, RECORDING_FORMAT

__all__ = ["MAX_WINDOWS", "LoadRecorder", "recording_meta", "write_recording"]

logger = logging.getLogger(__name__)

MAX_WINDOWS = 64
"""Windows kept (the most recent): DeepSeek-V3 (58 x 256 experts) takes 7.6 MB."""


def recording_meta(
    model: Any, model_name: str, num_ranks: int, **settings: Any
) -> dict[str, Any]:
    """Name and geometry of a vLLM ``MixtureOfExperts`` model, and ``settings``."""
    return {
        "model": model_name,
        "num_layers": model.num_moe_layers,
        "num_logical_experts": model.num_logical_experts,
        "num_physical_experts": model.num_physical_experts,
        "num_redundant_experts": model.num_redundant_experts,
        "num_expert_groups": model.num_expert_groups,
        "num_ranks": num_ranks,
        **settings,
    }


def write_recording(
    path: str | Path,
    load: np.ndarray,
    meta: dict[str, Any],
    placement: np.ndarray | None = None,
) -> None:
    """Write one recording atomically: a temporary file, then ``os.replace``."""
    path = Path(path)
    arrays = {
        META_KEY: np.array(json.dumps({**meta, "format": RECORDING_FORMAT})),
        "load": np.asarray(load, dtype=np.int64),
    }
    if placement is not None:
        arrays["placement"] = np.asarray(placement, dtype=np.int64)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600: others read recordings
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LoadRecorder:
    """Collects load windows of one model; writes them off the forward path.

    ``placement`` is called once, when the recording is closed, for the
    placement then in force (every layer is on its old or its new placement,
    never half of one, so any moment gives a valid placement).
    """

    def __init__(
        self,
        path: str | Path,
        meta: dict[str, Any],
        placement: Callable[[], torch.Tensor] | None = None,
        max_windows: int = MAX_WINDOWS,
    ) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(
                f"VLLM_ASYNC_EPLB_RECORD={str(path)!r}: directory "
                f"{self.path.parent} does not exist"
            )
        self._meta = dict(meta)
        self._placement = placement
        self._windows: deque[Any] = deque(maxlen=max_windows)
        self._times: deque[float] = deque(maxlen=max_windows)
        self._lock = threading.Lock()  # guards the deques and _dirty
        self._write_lock = threading.Lock()  # one writer at a time
        self._dirty = False
        self._closed = False
        self._wake = threading.Event()
        self.writes = 0
        self._thread = threading.Thread(
            target=self._run, name="async-eplb-record", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)

    def add_window(self, load: torch.Tensor) -> None:
        """One window ``[L, E]`` (summed over ranks); cheap, never blocks on I/O.

        ``load`` must not be written to afterwards (the vote's result is not).
        """
        with self._lock:
            if self._closed:
                return
            self._windows.append(load)
            self._times.append(time.time())
            self._dirty = True
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            self._write(placement=None)

    def _write(self, placement: np.ndarray | None) -> None:
        with self._write_lock:
            with self._lock:
                if not self._windows or not (self._dirty or placement is not None):
                    return
                windows, times = list(self._windows), list(self._times)
                self._dirty = False
            load = np.stack([torch.as_tensor(w).to("cpu").numpy() for w in windows])
            meta = {**self._meta, "window_times": times}
            try:
                write_recording(self.path, load, meta, placement)
                self.writes += 1
            except OSError as exc:  # a full disk must not stop serving
                logger.warning(
                    "async EPLB: recording %s not written: %s", self.path, exc
                )

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, with the placement in force; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._wake.set()
        self._thread.join(timeout)
        placement = None
        if self._placement is not None:
            try:
                placement = self._placement().to("cpu").numpy()
            except Exception as exc:  # e.g. the device is gone at exit
                logger.warning("async EPLB: recording without placement: %s", exc)
        self._write(placement)
