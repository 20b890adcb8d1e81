"""Fake collective works and a polling helper, shared by the wait tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

__all__ = ["FakeWork", "until"]


class FakeWork:
    """Completes when ``done`` is set; ``wait`` blocks like gloo's."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def is_completed(self) -> bool:
        return self.done.is_set()

    def wait(self, timeout: timedelta | None = None) -> bool:
        seconds = None if timeout is None else timeout.total_seconds()
        if not self.done.wait(seconds):
            raise RuntimeError("fake work timed out")
        return True


def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``condition`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.002)
