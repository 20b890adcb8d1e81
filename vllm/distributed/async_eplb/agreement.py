"""Cross-rank agreement without a per-step blocking collective.

All EP ranks call ``EplbState.step()`` once per engine step, so the step counter
is a shared clock. A vote is an ``async_op=True`` all-reduce (SUM) on a CPU gloo
group that nothing else uses, *launched* at step ``t`` and *read* at step
``t + delay``; every rank reads the same reduced tensor at the same step, so a
decision taken from it is identical everywhere. By then the all-reduce has
normally completed and reading it does not wait. Only a vote still incomplete
at its due step is waited for, and one still incomplete ``timeout_s`` later
raises ``VoteTimeout``, once: the group then has a collective that may never
end, and gloo runs a group's collectives in order, so the vote is *failed*
for good (:attr:`NonBlockingVote.failed`): later launches do nothing and later
reads return nothing at once, and no step waits on it again. A rank whose
vote failed stops voting, so its peers' next vote fails the same way: the
caller turns balancing off, and every rank ends up off.

A caller that votes while something is in flight (the "ready" vote of a
rebalance) need not launch at every step: :meth:`NonBlockingVote.may_launch`
allows one vote of a kind in flight at a time, launched ``launch_gap`` steps
after the previous one was read. That rule depends only on the step counter and
on votes every rank read at the same steps, so all ranks launch the same votes
at the same steps. With the default gap of 2 and a delay of 2, one step in
four launches, one reads and two are free (a vote per step made every step pay
both); a layer then commits every 4 steps instead of every 3.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "NonBlockingVote",
    "VoteError",
    "VoteResult",
    "VoteTimeout",
    "private_group",
]

_POLL_S = 0.0002


class VoteError(RuntimeError):
    """A vote failed (a peer died) or timed out: the caller aborts."""


class VoteTimeout(VoteError):
    """A vote was still incomplete ``timeout_s`` after its due step."""


@dataclass
class VoteResult:
    """A completed vote: ``total`` is the SUM over ranks of the payloads."""

    kind: str
    launched_at: int
    total: torch.Tensor
    context: Any


@dataclass
class _Pending:
    kind: str
    launched_at: int
    due_at: int
    tensor: torch.Tensor
    work: Any
    context: Any


class NonBlockingVote:
    """FIFO of in-flight all-reduces on one private group, read ``delay`` steps later.

    ``group`` None means a single rank: the payload is its own total.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        delay: int,
        timeout_s: float,
        launch_gap: int = 2,
    ) -> None:
        if delay < 1:
            raise ValueError(f"vote delay must be >= 1 step, got {delay}")
        if not timeout_s > 0:
            raise ValueError(f"vote timeout must be > 0 s, got {timeout_s}")
        if launch_gap < 1:
            raise ValueError(f"vote launch gap must be >= 1 step, got {launch_gap}")
        self.group = group
        self.delay = delay
        self.timeout_s = timeout_s
        self.launch_gap = launch_gap
        self.blocking_waits = 0
        """Votes that were not complete at their due step (each waited for)."""
        self.failed: str | None = None
        """Why a vote timed out or failed; from then on the vote is off."""
        self._pending: deque[_Pending] = deque()
        self._in_flight: dict[str, int] = {}  # kind -> votes launched, not read
        self._last_read: dict[str, int] = {}  # kind -> step its last vote was read
        # The process group's own allreduce: dist.all_reduce's Python checks
        # cost more than the launch itself, on a path that runs every step.
        self._allreduce = None
        if group is not None and dist.get_world_size(group) > 1:
            options = dist.AllreduceOptions()
            options.reduceOp = dist.ReduceOp.SUM
            self._allreduce = functools.partial(group.allreduce, opts=options)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def may_launch(self, step: int, kind: str) -> bool:
        """No vote of ``kind`` in flight, and ``launch_gap`` steps since its read.

        Identical on every rank (launches and reads happen at agreed steps).
        """
        if self.failed is not None or self._in_flight.get(kind):
            return False
        last_read = self._last_read.get(kind)
        return last_read is None or step >= last_read + self.launch_gap

    def launch(
        self,
        step: int,
        kind: str,
        payload: torch.Tensor | Sequence[int],
        context: Any = None,
    ) -> None:
        """Start a SUM all-reduce of ``payload``; never blocks.

        A list of ints is the cheapest payload; a CPU int64 tensor is reduced
        in place: pass a fresh one. Does nothing once the vote has failed.
        """
        if self.failed is not None:
            return
        if isinstance(payload, torch.Tensor):
            tensor = payload.detach().to("cpu", torch.int64)
        else:
            tensor = torch.tensor(payload, dtype=torch.int64)
        work = None if self._allreduce is None else self._allreduce([tensor])
        self._pending.append(
            _Pending(kind, step, step + self.delay, tensor, work, context)
        )
        self._in_flight[kind] = self._in_flight.get(kind, 0) + 1

    def collect(self, step: int) -> list[VoteResult]:
        """Votes due at or before ``step``, in launch order.

        Waits only for a vote not yet complete (counted in ``blocking_waits``);
        raises ``VoteTimeout`` if it stays incomplete for ``timeout_s``, and
        ``VoteError`` if the all-reduce failed (a peer died). Either fails the
        vote: every pending vote is dropped, and later calls return ``[]``.
        """
        try:
            return self._collect(step)
        except VoteError as exc:
            self.failed = str(exc)
            self._pending.clear()
            self._in_flight.clear()
            raise

    def _collect(self, step: int) -> list[VoteResult]:
        results = []
        while self._pending and self._pending[0].due_at <= step:
            item = self._pending[0]
            if item.work is not None and not item.work.is_completed():
                self.blocking_waits += 1
                deadline = time.monotonic() + self.timeout_s
                while not item.work.is_completed():
                    if time.monotonic() > deadline:
                        raise VoteTimeout(
                            f"{item.kind} vote launched at step {item.launched_at} "
                            f"still incomplete {self.timeout_s:.1f} s after its due "
                            f"step {item.due_at}"
                        )
                    time.sleep(_POLL_S)
            self._pending.popleft()
            self._in_flight[item.kind] -= 1
            self._last_read[item.kind] = step
            if item.work is not None:
                try:
                    item.work.wait()
                except RuntimeError as exc:
                    raise VoteError(
                        f"{item.kind} vote launched at step {item.launched_at} "
                        f"failed: {exc}"
                    ) from exc
            results.append(
                VoteResult(item.kind, item.launched_at, item.tensor, item.context)
            )
        return results

    def drain(self) -> None:
        """Wait for every in-flight vote (all ranks launched the same ones)."""
        if self._pending and self.failed is None:
            self.collect(self._pending[-1].due_at)


def private_group(
    my_ranks: Sequence[int],
    all_rank_lists: Sequence[Sequence[int]],
    backend: str = "gloo",
) -> dist.ProcessGroup | None:
    """Create one ``backend`` group per rank list; return the one holding this rank.

    ``torch.distributed.new_group`` must be called by every process for every
    group, in the same order; ``all_rank_lists`` lists all EP groups of the
    world (the caller gathers them). Returns None for a single-rank group.
    """
    me = dist.get_rank()
    if me not in my_ranks:
        raise ValueError(f"rank {me} is not in its own EP group {list(my_ranks)}")
    mine = None
    for ranks in sorted({tuple(sorted(r)) for r in all_rank_lists}):
        group = dist.new_group(list(ranks), backend=backend)
        if me in ranks:
            mine = group
    return mine if len(my_ranks) > 1 else None
