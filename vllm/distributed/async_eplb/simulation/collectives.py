"""Blocking collectives the forward thread makes inside ``EplbState.step()``.

Counted the same way for vLLM's EplbState and ours, so ``--compare`` can put
the two side by side. A call counts when it is made on the thread that armed
the counter, while armed, and returns only once the peers have joined: a
``torch.distributed`` collective without ``async_op=True``, or a
``batch_isend_irecv`` (vLLM's communicator waits for each batch at once).
Work a background thread does (our staging) is not a stall of the forward.

The wrappers replace the functions both in ``torch.distributed`` and where a
module imported them by name (vLLM's ``eplb_state`` imports ``all_reduce``,
its communicator ``batch_isend_irecv``), for modules already imported.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

__all__ = ["CollectiveCounter"]

_BLOCKING = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
    "batch_isend_irecv",
)
_PREFIXES = ("vllm.distributed.eplb", "vllm.distributed.async_eplb")


class CollectiveCounter:
    """``install()`` once for a run; set ``armed`` around each ``step()``
    (plain attribute writes: the counter runs inside the timed region);
    ``take()`` the count since the last take."""

    def __init__(self) -> None:
        self.armed = False
        self._count = 0
        self._thread = threading.current_thread()

    def take(self) -> int:
        count, self._count = self._count, 0
        return count

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if (
                self.armed
                and threading.current_thread() is self._thread
                and (name == "batch_isend_irecv" or not kwargs.get("async_op", False))
            ):
                self._count += 1
            return fn(*args, **kwargs)

        return counted

    def install(self) -> Callable[[], None]:
        """Wrap the collectives; returns the function that puts them back."""
        originals = {n: getattr(dist, n) for n in _BLOCKING if hasattr(dist, n)}
        wrapped = {n: self._wrap(n, fn) for n, fn in originals.items()}
        by_identity = {id(fn): n for n, fn in originals.items()}
        patched: list[tuple[Any, str, Any]] = [(dist, n, originals[n]) for n in wrapped]
        for module_name, module in list(sys.modules.items()):
            if module is None or not module_name.startswith(_PREFIXES):
                continue
            for attr, value in list(vars(module).items()):
                name = by_identity.get(id(value))
                if name is not None and value is originals[name]:
                    patched.append((module, attr, value))
        for module, attr, value in patched:
            setattr(module, attr, wrapped[by_identity[id(value)]])

        def uninstall() -> None:
            for module, attr, value in patched:
                setattr(module, attr, value)

        return uninstall
