"""Batched point-to-point staging: one batch per layer, few large messages.

On device collectives (NCCL, HCCL) nothing is packed: every message goes
straight from the sender's workspace rows into the receiver's staging rows,
all of a layer's messages in one coalesced batch, and the rank's local copies
run on its stream while the batch travels. A message is one weight tensor's
part of a run of experts consecutive on both sides when the staging buffer
is laid out by tensor, else one expert's row of one weight tensor (see
:func:`direct_runs`). On gloo, which pays per
message, the experts one rank sends to a peer are packed, all weight tensors
included, into ``row_bytes`` rows and sent as one message, spread to their
slots on arrival; on CPU the receives are posted first and each send as soon
as it is packed, and the rank's local copies run while the bytes travel.

Every message carries a tag derived from (job, layer within the job), so a
message left unmatched by an aborted job can never be received by a later one
on the same group. gloo honours tags; NCCL and HCCL ignore them, so on device
collectives the same guarantee comes from replacing the staging group after an
abort (what ``EplbState`` does when it recovers).
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.planner import LayerPlan, Transfer
from vllm.distributed.async_eplb.staging import RowLayout, copy_slot_runs, slot_runs
from vllm.distributed.async_eplb.transports import (
    TransferError,
    Transport,
    copy_duplicates,
    copy_local,
    row_nbytes,
)

__all__ = [
    "DeviceWaiter",
    "Message",
    "P2PTransport",
    "direct_messages",
    "direct_runs",
    "message_tag",
    "wait_on_device",
    "wait_works",
]

_JOB_BITS, _LAYER_BITS = 15, 16  # tag < 2**31: gloo takes a non-negative int
_ABORT_POLL_S = 2e-3


def message_tag(job: int, layer_seq: int) -> int:
    """The tag of every message of layer ``layer_seq`` of job ``job``.

    Jobs and layers wrap (32768 jobs, 65536 layers per job): a stale message
    would have to survive 32767 later jobs to be matched.
    """
    if job < 0 or layer_seq < 0:
        raise ValueError(f"job {job} and layer {layer_seq} must be >= 0")
    job_bits = job & ((1 << _JOB_BITS) - 1)
    return (job_bits << _LAYER_BITS) | (layer_seq & ((1 << _LAYER_BITS) - 1))


@dataclass
class Message:
    is_send: bool
    peer: int
    rows: torch.Tensor  # [n, row_bytes] uint8, contiguous


def _by_peer(
    transfers: Sequence[Transfer],
    peer_of: Callable[[Transfer], int],
    peers: set[int] | None,
) -> dict[int, list[Transfer]]:
    """Group by peer; within a peer, order by first target slot (both sides)."""
    grouped: dict[int, list[Transfer]] = {}
    for t in transfers:
        peer = peer_of(t)
        if peers is None or peer in peers:
            grouped.setdefault(peer, []).append(t)
    return {
        p: sorted(ts, key=lambda t: t.dst_slots[0]) for p, ts in sorted(grouped.items())
    }


def direct_runs(
    transfers: Sequence[Transfer], flat: bool
) -> list[tuple[int, int, int]]:
    """``(src_slot, dst_slot, n)`` of each run sent as its own message(s).

    ``transfers`` are one pair of ranks' transfers in the order both sides use
    (by first target slot), so sender and receiver derive the same runs.
    ``flat``: every staging tensor is contiguous (a buffer laid out by tensor,
    or one unpadded tensor), so each run of experts consecutive on both sides
    is one message per weight tensor. Otherwise each expert is a run of one:
    in interleaved staging rows, one expert's part of one tensor is
    contiguous, several experts' parts are not.
    """
    runs: list[tuple[int, int, int]] = []
    for t in transfers:
        src, dst = t.src_slot, t.dst_slots[0]
        if flat and runs:
            src0, dst0, n = runs[-1]
            if src == src0 + n and dst == dst0 + n:
                runs[-1] = (src0, dst0, n + 1)
                continue
        runs.append((src, dst, 1))
    return runs


def direct_messages(
    runs: Sequence[tuple[int, int, int]],
    tensors: Sequence[torch.Tensor],
    *,
    sender: bool,
) -> list[torch.Tensor]:
    """The byte views one side posts, one per (run, tensor), in posting order.

    The sender's come from its workspace tensors at the source slots, the
    receiver's from its staging views at the target slots; message ``i`` of
    the one matches message ``i`` of the other in size. A workspace slice
    that is not contiguous is copied (kept alive by the send until it is
    waited for); a staging view that is not contiguous is a layout error.
    Both sides' parts have the same shape and dtype, so a part is only viewed
    as bytes where its dtype is not already bytes (not every torch sends every
    dtype, e.g. float8, through NCCL); each tensor op costs host time.
    """
    out = []
    for src, dst, n in runs:
        first = src if sender else dst
        for tensor in tensors:
            part = tensor[first : first + n]
            if not part.is_contiguous():
                if not sender:
                    raise ValueError(
                        f"staging rows {dst}..{dst + n - 1} of a tensor of shape "
                        f"{tuple(tensor.shape)} are not contiguous"
                    )
                part = part.contiguous()
            out.append(part if part.dtype == torch.uint8 else part.view(torch.uint8))
    return out


def _raise_if_aborted(should_abort: Callable[[], bool], waiting_on: list[int]) -> None:
    if should_abort():
        raise TransferError(f"aborted while waiting for ranks {waiting_on}", waiting_on)


def _peers_of(peers: Sequence[Sequence[int]]) -> list[int]:
    return sorted({p for ps in peers for p in ps})


def _poll_works(
    works: Sequence[Any],
    peers: Sequence[Sequence[int]],
    deadline: float,
    timeout: float,
    should_abort: Callable[[], bool],
    progress: Callable[[Sequence[int]], None],
) -> None:
    """Poll device-collective works until done, aborted or past the deadline."""
    delay = 1e-4
    pending = list(range(len(works)))
    while pending:
        pending = [i for i in pending if not works[i].is_completed()]
        if not pending:
            return
        waiting_on = _peers_of([peers[i] for i in pending])
        progress(waiting_on)
        _raise_if_aborted(should_abort, waiting_on)
        if time.monotonic() > deadline:
            raise TransferError(
                f"timed out after {timeout:.1f}s waiting for ranks {waiting_on}",
                waiting_on,
            )
        time.sleep(delay)
        delay = min(delay * 2, 2e-3)


def _wait_each(
    works: Sequence[Any],
    peers: Sequence[Sequence[int]],
    deadline: float,
    progress: Callable[[Sequence[int]], None],
) -> None:
    """One bounded ``wait`` per work, all within ``deadline``."""
    for work, work_peers in zip(works, peers, strict=True):
        progress(sorted(work_peers))  # the peers this thread is blocked on now
        remaining = max(deadline - time.monotonic(), 1e-3)
        try:
            work.wait(timeout=timedelta(seconds=remaining))
        except Exception as exc:
            raise TransferError(
                f"transfer with ranks {list(work_peers)} failed: {exc}", work_peers
            ) from exc


def _wait_gloo(
    works: Sequence[Any],
    peers: Sequence[Sequence[int]],
    deadline: float,
    should_abort: Callable[[], bool],
    progress: Callable[[Sequence[int]], None],
    abandon: Callable[[Sequence[Any]], None],
) -> None:
    """gloo works: one bounded ``wait`` each, on a helper thread.

    gloo's point-to-point works report completion only from ``wait``, and a
    ``wait`` that times out closes the group's connections, so they cannot be
    polled in short slices. An abort returns at once and leaves the helper
    thread to finish or time out (closing the connections of a group the
    caller is giving up on: after an abort, staging moves to a fresh group);
    until then its transport counts it (``Transport.in_flight``).
    """
    _wait_on_thread(
        lambda: _wait_each(works, peers, deadline, progress),
        _peers_of(peers),
        should_abort,
        progress,
        deadline=None,  # the waits themselves end by the deadline
        abandon=abandon,
    )


def _wait_on_thread(
    block: Callable[[], None],
    peers: list[int],
    should_abort: Callable[[], bool],
    progress: Callable[[Sequence[int]], None],
    *,
    deadline: float | None,
    abandon: Callable[[Sequence[Any]], None],
) -> None:
    """Run the blocking ``block`` on a daemon thread; return when it ends.

    The caller wakes as soon as ``block`` returns (no polling), while
    ``should_abort`` is checked every few milliseconds and ``deadline`` (when
    given) is enforced here, leaving the thread behind, handed to ``abandon``.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            block()
        except BaseException as exc:  # handed to the calling thread
            failure.append(exc)
        finally:
            progress(())

    ended = threading.Event()

    def run_then_signal() -> None:
        try:
            run()
        finally:
            ended.set()

    waiter = threading.Thread(
        target=run_then_signal, name="async-eplb-wait", daemon=True
    )
    waiter.start()
    # ``ended`` is set once ``block`` has returned: no wait for the thread's
    # own teardown, which a join waits for (tens of microseconds a layer).
    _await_end(
        ended,
        failure,
        peers,
        should_abort,
        deadline=deadline,
        abandon=lambda: abandon([waiter]),
    )


def _await_end(
    ended: threading.Event,
    failure: list[BaseException],
    peers: list[int],
    should_abort: Callable[[], bool],
    *,
    deadline: float | None,
    abandon: Callable[[], None],
) -> None:
    """Return once a waiter thread set ``ended``, raising what it failed with.

    ``should_abort`` is checked every few milliseconds and ``deadline`` (when
    given) enforced here; on either, ``abandon`` is called before the
    ``TransferError`` is raised.
    """
    try:
        while not ended.wait(_ABORT_POLL_S):
            _raise_if_aborted(should_abort, peers)
            if deadline is not None and time.monotonic() > deadline:
                raise TransferError(f"timed out waiting for ranks {peers}", peers)
    except TransferError:
        abandon()
        raise
    if failure:
        raise failure[0]


# Each waiter thread running, with its queue (the thread's own entry goes
# when it ends): ended before the interpreter finalizes, see _end_waiters.
_WAITERS: dict[threading.Thread, queue.SimpleQueue] = {}
_WAITERS_LOCK = threading.Lock()
_EXIT_JOIN_S = 1.0


class DeviceWaiter:
    """One long-lived daemon thread that blocks on device events (GIL released).

    Started once, not per layer: starting a thread makes the caller wait
    until it runs, and a thread's end takes the GIL again; with the forward's
    thread busy in Python each such hand-over of the GIL can cost up to the
    interpreter's switch interval. The thread ends once this object is
    garbage-collected (or at exit) and the event it is blocked on (if any)
    completes.
    """

    def __init__(self, backend: DeviceBackend) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        thread = threading.Thread(
            target=_serve_waits,
            args=(self._jobs, backend),
            name="async-eplb-wait",
            daemon=True,
        )
        with _WAITERS_LOCK:
            _WAITERS[thread] = self._jobs
        thread.start()
        weakref.finalize(self, self._jobs.put, None)

    def submit(self, event: Any) -> tuple[threading.Event, list[BaseException]]:
        """Block on ``event`` on the thread: set when it is done, with the
        exception it raised (if any) in the list."""
        ended: threading.Event = threading.Event()
        failure: list[BaseException] = []
        self._jobs.put((event, ended, failure))
        return ended, failure


def _serve_waits(jobs: queue.SimpleQueue, backend: DeviceBackend) -> None:
    """The waiter thread: each job's event, in order, until ``None``."""
    try:
        while (job := jobs.get()) is not None:
            event, ended, failure = job
            try:
                backend.synchronize_event(event)
            except BaseException as exc:  # handed to the waiting thread
                failure.append(exc)
            finally:
                ended.set()
    finally:
        with _WAITERS_LOCK:
            _WAITERS.pop(threading.current_thread(), None)


@atexit.register
def _end_waiters() -> None:
    """End the waiter threads while the interpreter still runs them.

    A daemon thread woken once the interpreter is finalizing is stopped
    where it stands; with torch's per-thread state that aborted the process
    ("terminate called without an active exception", 5 of 6 runs on two
    H200s whose transport was alive at exit). A thread still blocked on a
    transfer that never ends is left after ``_EXIT_JOIN_S``.
    """
    with _WAITERS_LOCK:
        running = list(_WAITERS.items())
    for _, jobs in running:
        jobs.put(None)
    deadline = time.monotonic() + _EXIT_JOIN_S
    for thread, _ in running:
        thread.join(max(0.0, deadline - time.monotonic()))


def wait_on_device(
    works: Sequence[Any],
    peers: Sequence[Sequence[int]],
    backend: DeviceBackend,
    timeout: float,
    should_abort: Callable[[], bool],
    progress: Callable[[Sequence[int]], None] = lambda peers: None,
    abandon: Callable[[Sequence[Any]], None] = lambda items: None,
    waiter: DeviceWaiter | None = None,
) -> None:
    """Device-collective works (NCCL, HCCL): wait without polling.

    The caller's stream waits for the works at once (``work.wait()`` blocks
    no host thread there); ``waiter``'s thread (a fresh one when ``None``)
    then blocks on one event after them, with the GIL released, so the
    caller wakes as soon as the bytes have landed, and gives up on abort or
    after ``timeout``. Polling instead either sees the end late or wakes
    often, each wake-up taking the GIL from the forward's thread. On abort or
    timeout the works still running are handed to ``abandon`` (their
    receives may still land; the transport counts them until they complete);
    the waiter's thread ends its wait when they do.
    """
    if not works:
        return
    deadline = time.monotonic() + timeout
    everyone = _peers_of(peers)
    _raise_if_aborted(should_abort, everyone)
    for work in works:
        work.wait()
    done = backend.new_event()
    backend.record_event(done)
    progress(everyone)
    ended, failure = (waiter or DeviceWaiter(backend)).submit(done)
    try:
        _await_end(
            ended,
            failure,
            everyone,
            should_abort,
            deadline=deadline,
            abandon=lambda: abandon(list(works)),
        )
    finally:
        progress(())


def wait_works(
    works: Sequence[Any],
    peers: Sequence[Sequence[int]],
    timeout: float,
    should_abort: Callable[[], bool],
    *,
    pollable: bool = True,
    progress: Callable[[Sequence[int]], None] = lambda peers: None,
    abandon: Callable[[Sequence[Any]], None] = lambda items: None,
) -> None:
    """Wait for every work, never longer than ``timeout``; errors name peers.

    Gives up with ``TransferError`` as soon as ``should_abort()`` is true (a
    stop request), without waiting out ``timeout``. ``pollable`` works (NCCL,
    HCCL) are polled (:func:`wait_on_device` waits for them without polling);
    gloo's are waited for on a helper thread (see ``_wait_gloo``).
    ``progress`` is told the peers still waited for as they change (from the
    helper thread for gloo); ``()`` once the wait ends. What it gives up on,
    works still running or gloo's helper thread, goes to ``abandon``.
    """
    deadline = time.monotonic() + timeout
    if not works:
        return
    if not pollable:
        # An abandoned gloo wait goes on on its helper thread and reports
        # ``()`` when it ends, not here.
        _wait_gloo(works, peers, deadline, should_abort, progress, abandon)
        return
    try:
        _raise_if_aborted(should_abort, _peers_of(peers))
        _poll_works(works, peers, deadline, timeout, should_abort, progress)
        _wait_each(works, peers, deadline, progress)
    except TransferError:
        abandon(list(works))  # the transport counts those not completed
        raise
    finally:
        progress(())


class P2PTransport(Transport):
    name = "p2p"

    def __init__(self, backend: DeviceBackend, group: Any, *, timeout: float) -> None:
        self.backend = backend
        self.group = group
        self.timeout = timeout
        self.pollable = "gloo" not in str(dist.get_backend(group))
        self._scratch = torch.empty(0, dtype=torch.uint8, device=backend.device)
        self._global_rank: dict[int, int] = {}
        self._coalesces = self.pollable and _coalesces(group, backend.device)
        # started with the transport (start-up), not at the first layer
        self._waiter = DeviceWaiter(backend) if self.pollable else None
        self._job = 0
        self._layer_seq = 0

    def prepare_job(self, job_id: int) -> None:
        """Start job ``job_id``'s tag space (agreed by every rank); all ranks
        call it before the job's first layer."""
        if job_id < 0:
            raise ValueError(f"job_id must be >= 0, got {job_id}")
        self._job = job_id
        self._layer_seq = 0

    def stage_layer(
        self,
        plan: LayerPlan,
        rank: int,
        weights: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        *,
        packed: torch.Tensor | None = None,
    ) -> int:
        return self.exchange(
            plan,
            rank,
            weights,
            buffers,
            packed=packed,
            local=lambda: copy_local(plan.ranks[rank], weights, buffers),
        )

    def exchange(
        self,
        plan: LayerPlan,
        rank: int,
        weights: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        *,
        packed: torch.Tensor | None = None,
        peers: set[int] | None = None,
        local: Callable[[], None] | None = None,
    ) -> int:
        """Sends and receives of ``rank`` with ``peers`` (all when ``None``).

        ``local`` (the rank's own copies) runs while messages are in flight
        where the transport allows, else before them. Every call is one layer
        of the current job on every rank (it advances the message tag).
        """
        tag = message_tag(self._job, self._layer_seq)
        self._layer_seq += 1
        rank_plan = plan.ranks[rank]
        sends = _by_peer(rank_plan.sends, lambda t: t.dst_rank, peers)
        recvs = _by_peer(rank_plan.receives, lambda t: t.src_rank, peers)
        if not sends and not recvs:
            if local is not None:
                local()
            return 0
        if self.pollable:
            # Staging laid out by tensor (or one unpadded tensor): a run of
            # experts of one tensor is contiguous. Every rank's buffer has
            # the same layout, so both sides of a pair cut the same messages.
            flat = all(b.is_contiguous() for b in buffers)
            self._exchange_direct(sends, recvs, weights, buffers, flat, local, tag)
            copy_duplicates(rank_plan, buffers, peers)
            return sum(map(len, recvs.values())) * row_nbytes(weights)
        layout = RowLayout.of(weights)
        recv_spans = [
            (peer, ts[offset : offset + length])
            for peer, ts in recvs.items()
            for offset, length in self._message_spans(ts)
        ]
        direct = [packed is not None and _is_run(ts) for _, ts in recv_spans]
        scratch_rows = sum(map(len, sends.values())) + sum(
            len(ts)
            for (_, ts), straight in zip(recv_spans, direct, strict=True)
            if not straight
        )
        scratch = self._scratch_rows(scratch_rows, layout.row_bytes)
        cursor = 0
        receives: list[Message] = []
        spread: list[tuple[torch.Tensor, list[tuple[int, int, int]]]] = []
        for (peer, ts), straight in zip(recv_spans, direct, strict=True):
            if straight:  # lands in the staging rows themselves
                assert packed is not None
                first = ts[0].dst_slots[0]
                rows = packed[first : first + len(ts)]
            else:  # lands in scratch rows, then spread to the target slots
                rows = scratch[cursor : cursor + len(ts)]
                cursor += len(ts)
                firsts = [t.dst_slots[0] for t in ts]
                spread.append((rows, slot_runs(firsts, range(len(ts)))))
            receives.append(Message(False, peer, rows))
        packed_sends: list[tuple[int, list[Transfer], torch.Tensor]] = []
        for peer, ts in sends.items():
            packed_sends.append((peer, ts, scratch[cursor : cursor + len(ts)]))
            cursor += len(ts)

        def pack(ts: Sequence[Transfer], rows: torch.Tensor) -> None:
            runs = slot_runs(range(len(ts)), [t.src_slot for t in ts])
            copy_slot_runs(layout.views(rows), weights, runs)

        if self._streams_messages:
            self._stream(receives, packed_sends, pack, local, tag)
        else:
            if local is not None:
                local()
            messages = list(receives)
            for peer, ts, rows in packed_sends:
                pack(ts, rows)
                messages += [
                    Message(True, peer, rows[offset : offset + length])
                    for offset, length in self._message_spans(ts)
                ]
            self._run(messages, tag)
        for rows, runs in spread:
            copy_slot_runs(buffers, layout.views(rows), runs)
        copy_duplicates(rank_plan, buffers, peers)
        return sum(map(len, recvs.values())) * row_nbytes(weights)

    def _exchange_direct(
        self,
        sends: dict[int, list[Transfer]],
        recvs: dict[int, list[Transfer]],
        weights: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        flat: bool,
        local: Callable[[], None] | None,
        tag: int,
    ) -> None:
        """Device collectives: workspace rows to staging rows, no packing.

        The batch is posted before the local copies, so that the messages do
        not wait for them on the device; the copies then run beside them.
        """
        messages = [
            Message(False, peer, rows)
            for peer, ts in recvs.items()
            for rows in direct_messages(direct_runs(ts, flat), buffers, sender=False)
        ]
        messages += [
            Message(True, peer, rows)
            for peer, ts in sends.items()
            for rows in direct_messages(direct_runs(ts, flat), weights, sender=True)
        ]
        works, peers = self._post(messages, tag)
        if local is not None:
            local()
        wait_on_device(
            works,
            peers,
            self.backend,
            self.timeout,
            self.should_abort,
            progress=self._set_waiting_on,
            abandon=self._abandon,
            waiter=self._waiter,
        )

    @property
    def _streams_messages(self) -> bool:
        """Post messages one by one as they are ready (gloo on host memory)."""
        return not self.pollable and self.backend.is_synchronous

    def _message_spans(self, transfers: Sequence[Transfer]) -> list[tuple[int, int]]:
        """``(offset, length)`` of each message between one pair of ranks.

        gloo pays per message (one message per peer is about twice as fast on
        loopback), so staged through host memory it gets one per peer and the
        receiver spreads the rows. On CPU, each run of consecutive target
        slots is one message landing straight in the staging rows (no receive
        copy). Depends only on the plan and the group, so both sides split
        alike. (Device collectives do not pack: see :func:`direct_runs`.)
        """
        if not self.pollable and not self._streams_messages:
            return [(0, len(transfers))]
        spans: list[tuple[int, int]] = []
        for i, t in enumerate(transfers):
            if spans and t.dst_slots[0] == transfers[i - 1].dst_slots[0] + 1:
                spans[-1] = (spans[-1][0], spans[-1][1] + 1)
            else:
                spans.append((i, 1))
        return spans

    def _peer(self, peer: int) -> int:
        global_rank = self._global_rank.get(peer)
        if global_rank is None:
            global_rank = dist.get_global_rank(self.group, peer)
            self._global_rank[peer] = global_rank
        return global_rank

    def _stream(
        self,
        receives: Sequence[Message],
        sends: Sequence[tuple[int, list[Transfer], torch.Tensor]],
        pack: Callable[[Sequence[Transfer], torch.Tensor], None],
        local: Callable[[], None] | None,
        tag: int,
    ) -> None:
        """Receives first, each send once packed, local copies meanwhile.

        A peer that is ready can deliver at once, and a slow peer is waited
        for while this rank still has copying to do.
        """
        works, peers = [], []
        for m in receives:
            works.append(dist.irecv(m.rows, self._peer(m.peer), self.group, tag))
            peers.append([m.peer])
        for peer, ts, rows in sends:
            pack(ts, rows)
            for offset, length in self._message_spans(ts):
                message = rows[offset : offset + length]
                works.append(dist.isend(message, self._peer(peer), self.group, tag))
                peers.append([peer])
        if local is not None:
            local()
        self._wait(works, peers, pollable=False)

    def _run(self, messages: Sequence[Message], tag: int) -> None:
        """Post every message as one batch and wait for all of them."""
        works, peers = self._post(messages, tag)
        self._wait(works, peers, pollable=self.pollable)

    def _post(
        self, messages: Sequence[Message], tag: int
    ) -> tuple[list[Any], list[list[int]]]:
        """Post every message as one batch: its works and the peers of each."""
        if self._coalesces:
            # What ``batch_isend_irecv`` does on NCCL / HCCL, straight on the
            # process group: one group of sends and receives, one work, without
            # its per-message Python checks (host time before the batch starts).
            device = self.backend.device
            self.group._start_coalescing(device)
            for m in messages:
                post = self.group.send if m.is_send else self.group.recv
                post([m.rows], m.peer, tag)
            work = self.group._end_coalescing(device)
            return [work], [sorted({m.peer for m in messages})]
        ops = [
            dist.P2POp(
                dist.isend if m.is_send else dist.irecv,
                m.rows,
                self._peer(m.peer),
                self.group,
                tag,
            )
            for m in messages
        ]
        works = dist.batch_isend_irecv(ops)
        if len(works) == len(messages):
            peers = [[m.peer] for m in messages]
        else:  # coalesced into one work (NCCL / HCCL)
            everyone = sorted({m.peer for m in messages})
            peers = [everyone] * len(works)
        return list(works), peers

    def _scratch_rows(self, num_rows: int, row_bytes: int) -> torch.Tensor:
        """Grow-only scratch, reused across layers: no allocation per layer."""
        needed = num_rows * row_bytes
        if self._scratch.numel() < needed:
            self._scratch = torch.empty(
                needed, dtype=torch.uint8, device=self.backend.device
            )
        return self._scratch[:needed].view(num_rows, row_bytes)


def _coalesces(group: Any, device: torch.device) -> bool:
    """Does ``group`` coalesce point-to-point messages on ``device`` into one
    work (NCCL, HCCL), as ``batch_isend_irecv`` checks?"""
    try:
        return (
            type(group) is dist.ProcessGroup
            and bool(group._get_backend(device).supports_coalescing)
            and hasattr(group, "_start_coalescing")
        )
    except (AttributeError, RuntimeError, ValueError):
        return False


def _is_run(transfers: Sequence[Transfer]) -> bool:
    """Do the transfers target consecutive slots, in order?"""
    first = transfers[0].dst_slots[0]
    return all(t.dst_slots[0] == first + i for i, t in enumerate(transfers))
