"""One small device abstraction: streams, events and pinned memory.

CUDA and NPU (Ascend, through ``torch_npu`` imported only when present) go
through ``torch.Stream`` / ``torch.Event`` and ``torch.accelerator``; on CPU
work is synchronous, so streams and events are no-ops and an event is always
done. Nothing else in async_eplb calls ``torch.cuda`` directly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["DeviceBackend"]

logger = logging.getLogger(__name__)


def _import_torch_npu() -> None:
    """Registers the ``npu`` device type with torch; absent on most hosts."""
    if importlib.util.find_spec("torch_npu") is None:
        raise ValueError("device type 'npu' needs torch_npu, which is not installed")
    importlib.import_module("torch_npu")


class DeviceBackend:
    """Streams, events and host memory for one device.

    Build one with :meth:`for_device`. ``None`` streams mean "the current one".
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._synchronous = self.device.type == "cpu"

    @classmethod
    def for_device(cls, device: torch.device | str | int) -> DeviceBackend:
        dev = torch.device(device)
        if dev.type == "npu":
            _import_torch_npu()
        if dev.type not in ("cpu", "cuda", "npu"):
            raise ValueError(f"unsupported device type {dev.type!r} for {dev}")
        if dev.type != "cpu" and dev.index is None:
            dev = torch.device(dev.type, torch.accelerator.current_device_index())
        return cls(dev)

    @property
    def is_synchronous(self) -> bool:
        """True on CPU: work is done when the call returns."""
        return self._synchronous

    def new_stream(self, priority: int = 0) -> torch.Stream | None:
        """A new side stream (lower ``priority`` numbers run first on CUDA)."""
        if self._synchronous:
            return None
        return torch.Stream(device=self.device, priority=priority)

    def current_stream(self) -> torch.Stream | None:
        if self._synchronous:
            return None
        return torch.accelerator.current_stream(self.device)

    @contextlib.contextmanager
    def stream(self, stream: torch.Stream | None) -> Iterator[None]:
        """Make ``stream`` current for the block (no-op for ``None`` / CPU)."""
        if self._synchronous or stream is None:
            yield
            return
        previous = torch.accelerator.current_stream(self.device)
        torch.accelerator.set_stream(stream)
        try:
            yield
        finally:
            torch.accelerator.set_stream(previous)

    def new_event(self) -> torch.Event | None:
        if self._synchronous:
            return None
        return torch.Event(device=self.device)

    def record_event(
        self, event: torch.Event | None, stream: torch.Stream | None = None
    ) -> None:
        if self._synchronous or event is None:
            return
        event.record(stream if stream is not None else self.current_stream())

    def event_done(self, event: torch.Event | None) -> bool:
        """Non-blocking: has the work before ``event`` finished on the device?"""
        if self._synchronous or event is None:
            return True
        return bool(event.query())

    def wait_event(
        self, event: torch.Event | None, stream: torch.Stream | None = None
    ) -> None:
        """Make ``stream`` (default: current) wait for ``event``; no CPU block."""
        if self._synchronous or event is None:
            return
        event.wait(stream if stream is not None else self.current_stream())

    def synchronize_event(self, event: torch.Event | None) -> None:
        """Block the calling thread until ``event`` is done."""
        if self._synchronous or event is None:
            return
        event.synchronize()

    def synchronize_stream(self, stream: torch.Stream | None) -> None:
        if self._synchronous or stream is None:
            return
        stream.synchronize()

    def synchronize(self) -> None:
        if self._synchronous:
            return
        torch.accelerator.synchronize(self.device)

    def empty_pinned(
        self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype
    ) -> torch.Tensor:
        """Host memory the device can copy to and from asynchronously."""
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=not self._synchronous)

    def set_device(self) -> None:
        """Bind the calling thread to this device (new threads start on index 0)."""
        if not self._synchronous:
            torch.accelerator.set_device_index(self.device.index)

    def ipc_handle(self, tensor: torch.Tensor) -> Any:
        """A picklable handle another process on this node can open (CUDA only)."""
        if self.device.type != "cuda":
            raise ValueError(f"IPC handles need a CUDA device, not {self.device}")
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(tensor)

    @staticmethod
    def open_ipc_handle(handle: Any) -> torch.Tensor:
        """Open a handle from :meth:`ipc_handle` (in another process)."""
        rebuild, args = handle
        return rebuild(*args)

    def __repr__(self) -> str:
        return f"DeviceBackend({self.device})"
