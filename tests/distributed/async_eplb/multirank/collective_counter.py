"""Test scaffolding: counts blocking ``torch.distributed`` collectives.

The multi-rank tests check that ``EplbState.step()`` issues no blocking
collective in async mode. Not part of the runtime package.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

__all__ = ["BlockingCollectiveCounter"]


_COLLECTIVES = (
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
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
)


class BlockingCollectiveCounter:
    """Counts blocking ``torch.distributed`` collectives issued by one thread.

    A call counts unless it passes ``async_op=True``; the patch wraps the
    module attributes, so it sees code that calls ``dist.<op>(...)``.
    """

    def __init__(self, thread: threading.Thread | None = None) -> None:
        self.thread = thread or threading.current_thread()
        self.count = 0
        self.by_name: dict[str, int] = {}

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is self.thread and not kwargs.get(
                "async_op", False
            ):
                self.count += 1
                self.by_name[name] = self.by_name.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted

    @contextmanager
    def installed(self) -> Iterator[BlockingCollectiveCounter]:
        originals = {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}
        try:
            for name, fn in originals.items():
                setattr(dist, name, self._wrap(name, fn))
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
