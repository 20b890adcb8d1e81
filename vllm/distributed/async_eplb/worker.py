"""Background staging: one daemon thread per ``EplbState``, its own stream.

A :class:`StagingWorker` per model holds that model's job, staging buffer and
transport; the models' workers share one :class:`StagingThread`, which stages
their jobs layer after layer, in the order the main thread submitted them,
while the engine keeps serving. One thread means one order of transfers on
every rank: two models' messages never interleave on the staging group (NCCL
would need the same order on every rank; gloo would match one model's message
to the other's receive), and each job gets its own tag space. The main thread
commits staged layers between steps (:meth:`StagingWorker.commit_layer`).

Which layers the worker may stage is decided by the main thread only, so it is
the same on every rank: a job's first ``ring_size`` layers at ``submit``, one
more at each commit. ``cancel`` drops the layers not yet allowed; a layer
already allowed is still staged (peers are staging it too, and their messages
must be matched) and then thrown away. Workspace weights change only in
``commit_layer``, so a cancelled layer leaves them untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.maps import ExpertMaps, LayerMaps
from vllm.distributed.async_eplb.planner import LayerPlan
from vllm.distributed.async_eplb.staging import RowLayout, StagingBuffer, slot_runs
from vllm.distributed.async_eplb.step_gate import StepGate
from vllm.distributed.async_eplb.transports import TransferError, Transport

__all__ = [
    "StagingError",
    "StagingStats",
    "StagingThread",
    "StagingWorker",
    "WorkerStatus",
]

logger = logging.getLogger(__name__)


class StagingError(RuntimeError):
    """Staging a layer failed; names the layer and, when known, the peers."""

    def __init__(self, layer: int, peers: Sequence[int], cause: BaseException):
        where = f" with ranks {list(peers)}" if peers else ""
        super().__init__(f"staging layer {layer} failed{where}: {cause}")
        self.layer = layer
        self.peers = tuple(peers)


@dataclass
class StagingStats:
    """Per-layer staging time (seconds, until the device finished) and bytes."""

    job_id: int = -1
    layer_seconds: dict[int, float] = field(default_factory=dict)
    layer_bytes: dict[int, int] = field(default_factory=dict)

    @property
    def bytes_received(self) -> int:
        return sum(self.layer_bytes.values())

    @property
    def seconds(self) -> float:
        return sum(self.layer_seconds.values())


@dataclass(frozen=True)
class WorkerStatus:
    """One consistent view of a worker, taken under its lock.

    The main thread reads this snapshot, never the worker's live fields,
    which the staging thread writes.
    """

    job_id: int
    staged: tuple[int, ...]
    """Layers of the current job staged (device copies done), not committed."""
    error: BaseException | None
    """The last staging failure of this model's job, or the thread's death."""
    death: BaseException | None
    busy: bool
    """A job is in flight: submitted, not cancelled, not fully committed."""
    idle: bool
    """The thread is not inside a layer (of any model's job)."""
    bytes_received: int
    layer_seconds: tuple[float, ...]


@dataclass(frozen=True)
class _StagedLayer:
    """A staged layer, with everything its commit needs made beforehand.

    The staging thread builds the copies' views (workspace slices, staging
    slices, map rows) and the release event while staging, so the commit on
    the engine's thread launches them in one call: no slicing, no planning.
    """

    ring_slot: int
    event: object  # the device has staged the layer once it is done
    prepared: LayerMaps | None
    map_rows: list[torch.Tensor]  # the maps' rows of the layer (if prepared)
    map_values: list[torch.Tensor]  # the prepared rows they are set to
    # per dtype: workspace slices of the changed slots' runs, and the staging
    # buffer's slices they are copied from
    dst: list[list[torch.Tensor]]
    src: list[list[torch.Tensor]]
    released: object  # recorded after the commit's copies


def copy_rows(
    dst: Sequence[Sequence[torch.Tensor]], src: Sequence[Sequence[torch.Tensor]]
) -> None:
    """``dst[g][i] = src[g][i]`` on the current stream, one call per group.

    Each group shares one dtype (``by_dtype``), so each call is one fused
    kernel: ``torch._foreach_copy_`` on mixed dtypes falls back to a copy per
    tensor (a quantized layer's int8 weights and uint8 scales, 31-32 runs of
    changed slots: 0.67-0.90 ms of host time on the H200s).
    """
    for group_dst, group_src in zip(dst, src, strict=True):
        torch._foreach_copy_(group_dst, group_src, non_blocking=True)


def by_dtype(
    dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """The pairs ``(dst[i], src[i])`` grouped by ``dst[i]``'s dtype, in order
    within each group (``copy_rows``' groups); no group is empty."""
    groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(dst, src, strict=True):
        group = groups.setdefault(d.dtype, ([], []))
        group[0].append(d)
        group[1].append(s)
    return [g[0] for g in groups.values()], [g[1] for g in groups.values()]


def _load_copy_kernels(weights: Sequence[torch.Tensor]) -> None:
    """Launch the commit's copies once now, at start-up, on scratch tensors.

    ``torch._foreach_copy_`` runs one fused kernel per dtype when its tensors
    share one (the maps' int64 rows, weights of one dtype); the first launch
    of a kernel loads it (CUDA lazy loading): 13-18 ms of host time on the
    H200s, which landed on the first commit's step.
    """
    for dtype in {t.dtype for t in weights} | {torch.int64}:
        scratch = torch.zeros(2, dtype=dtype, device=weights[0].device)
        copy_rows([[scratch[:1]]], [[scratch[1:]]])


@dataclass
class _Job:
    worker: StagingWorker
    job_id: int
    layers: list[int]
    plans: dict[int, LayerPlan]
    ready_event: object
    allowed: int  # layers[:allowed] may be staged
    maps: ExpertMaps | None = None  # with new_rows: maps prepared while staging
    new_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    next_index: int = 0
    cancelled: bool = False
    staged: dict[int, _StagedLayer] = field(default_factory=dict)
    """Staged layers not yet committed."""
    committed: int = 0

    @property
    def stage_limit(self) -> int:
        return min(self.allowed, len(self.layers))


class StagingThread:
    """The thread that stages every model's jobs, one layer at a time.

    Jobs are staged in submission order, each to its last allowed layer
    before the next begins, so every rank runs the same transfers in the same
    order. All state, the models' workers' included, is guarded by ``cond``.
    """

    def __init__(
        self, backend: DeviceBackend, *, rank: int, gate: StepGate | None = None
    ) -> None:
        self.backend = backend
        self.rank = rank
        self.gate = gate
        """Passed before each piece of Python work (``step_gate.py``)."""
        self.cond = threading.Condition()
        self.stop_event = threading.Event()
        self.queue: deque[_Job] = deque()  # jobs still to stage, in order
        self.in_layer = False  # staging a layer right now
        self._death: BaseException | None = None
        self._jobs_started = 0  # tag space of the next job (same on every rank)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; later calls (one per model) do nothing."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"async-eplb-staging-{self.rank}", daemon=True
            )
            self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        """The thread, once started (for its owner to join at shutdown)."""
        return self._thread

    def stop(self, timeout: float) -> None:
        """End the thread promptly (a wait on peers is abandoned) and join it."""
        self.stop_event.set()
        with self.cond:
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and timeout > 0:
                logger.warning("staging thread did not stop within %.1fs", timeout)

    @property
    def death(self) -> BaseException | None:
        """What ended the thread unexpectedly (not a stop request), else None."""
        with self.cond:
            return self._death

    def _run(self) -> None:
        try:
            self.backend.set_device()
            stream = self.backend.new_stream()
            with self.backend.stream(stream):
                while True:
                    task = self._next_task()
                    if task is None:
                        return
                    self.pause()
                    try:
                        task[0].worker._stage(*task)
                    finally:
                        with self.cond:
                            self.in_layer = False
        except BaseException as exc:  # never lost: handed to the main thread
            logger.exception("staging worker thread died")
            with self.cond:
                self._death = exc

    def pause(self) -> None:
        """Wait while the engine is inside a step (never holding ``cond``)."""
        if self.gate is not None:
            self.gate.wait()

    def _next_task(self) -> tuple[_Job, int, int, object, int | None] | None:
        """Wait for a layer that may be staged; ``None`` means stop.

        Returns the job, the layer, its ring slot, the event after which that
        slot may be overwritten, and, for a job's first layer, the tag space
        the job's transfers use.
        """
        with self.cond:
            while not self.stop_event.is_set():
                if self.queue:
                    job = self.queue[0]
                    if job.next_index < job.stage_limit:
                        ring_slot, free_event = job.worker._free_slots.popleft()
                        layer = job.layers[job.next_index]
                        job.next_index += 1
                        self.in_layer = True
                        tag_space = None
                        if job.next_index == 1:
                            tag_space = self._jobs_started
                            self._jobs_started += 1
                        return job, layer, ring_slot, free_event, tag_space
                    if job.cancelled or job.next_index == len(job.layers):
                        self.queue.popleft()
                        continue
                self.cond.wait()
            self.queue.clear()  # nothing more is staged: free the jobs' buffers
            return None


class StagingWorker:
    """One model's staging: its job, staging buffer and transport.

    Staged by a :class:`StagingThread`, shared by every model of an
    ``EplbState`` (pass ``thread``); a worker made without one gets its own.
    """

    def __init__(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        buffer: StagingBuffer,
        transport: Transport,
        backend: DeviceBackend,
        *,
        rank: int,
        thread: StagingThread | None = None,
    ) -> None:
        if not expert_weights:
            raise ValueError("expert_weights has no layers")
        for layer, weights in enumerate(expert_weights):
            if RowLayout.of(weights) != buffer.layout:
                raise ValueError(
                    f"layer {layer}'s expert weights do not match the staging "
                    "buffer's shapes and dtypes"
                )
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if thread is not None and thread.rank != rank:
            raise ValueError(f"rank {rank} differs from its thread's {thread.rank}")
        self.expert_weights = [list(w) for w in expert_weights]
        _load_copy_kernels(self.expert_weights[0])
        self.buffer = buffer
        self.transport = transport
        self.backend = backend
        self.rank = rank
        self.stats = StagingStats()
        self._wake_pending = False
        self._thread = thread or StagingThread(backend, rank=rank)
        self._cond = self._thread.cond
        self._started = False
        self._active: _Job | None = None  # the job commits refer to
        # free ring slots with the event after which they may be overwritten
        self._free_slots: deque[tuple[int, object]] = deque(
            (i, None) for i in range(buffer.ring_size)
        )
        self._error: BaseException | None = None
        transport.set_abort_check(self._thread.stop_event.is_set)

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Start staging for this model (the shared thread starts once)."""
        if self._started:
            raise RuntimeError("the staging worker was already started")
        self._started = True
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the staging thread (every model's) and join it."""
        self._thread.stop(timeout)

    @property
    def error(self) -> BaseException | None:
        """The last staging failure of this model's job, or the thread's death
        (cleared by ``submit``)."""
        with self._cond:
            return self._error if self._error is not None else self._thread._death

    @property
    def death(self) -> BaseException | None:
        """What ended the staging thread unexpectedly, else None."""
        return self._thread.death

    def status(self) -> WorkerStatus:
        """A snapshot of everything the main thread reads, under the lock."""
        with self._cond:
            job, death = self._active, self._thread._death
            staged: tuple[int, ...] = ()
            if job is not None:
                staged = self._done_layers(job)
            return WorkerStatus(
                job_id=self.stats.job_id,
                staged=staged,
                error=self._error if self._error is not None else death,
                death=death,
                busy=job is not None,
                idle=not self._thread.in_layer,
                bytes_received=self.stats.bytes_received,
                layer_seconds=tuple(self.stats.layer_seconds.values()),
            )

    @property
    def idle(self) -> bool:
        """The thread is not inside a layer (of any model's job, dropped or not).

        A dropped job's layer may still be waiting on peers; a new job must
        not start its transfers before, or their messages could meet.
        """
        with self._cond:
            return not self._thread.in_layer

    @property
    def busy(self) -> bool:
        """A job is in flight: submitted, not cancelled, not fully committed."""
        with self._cond:
            return self._active is not None

    def waiting_for(self) -> tuple[int, ...]:
        """Peer ranks the thread's transfer is blocked on right now."""
        return self.transport.waiting_for()

    # ---- main thread -----------------------------------------------------

    def submit(
        self,
        job_id: int,
        plans: Mapping[int, LayerPlan],
        *,
        maps: ExpertMaps | None = None,
        new_rows: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        """Stage ``plans`` (layer -> plan) in ascending layer order.

        With ``maps`` and ``new_rows`` (layer -> new phy2log row) the worker
        also prepares each layer's maps on the device while staging, so that
        :meth:`commit_layer` needs no host work.
        """
        if (maps is None) != (new_rows is None):
            raise ValueError("maps and new_rows must be given together")
        if new_rows is not None and set(new_rows) != set(plans):
            raise ValueError(
                f"new_rows covers layers {sorted(new_rows)}, plans {sorted(plans)}"
            )
        num_layers = len(self.expert_weights)
        slots = self.buffer.num_slots_per_rank
        for layer, plan in plans.items():
            if not 0 <= layer < num_layers:
                raise ValueError(f"layer {layer} is out of range [0, {num_layers})")
            if plan.slots_per_rank != slots or not 0 <= self.rank < plan.num_ranks:
                raise ValueError(
                    f"plan of layer {layer} is for {plan.num_ranks} ranks x "
                    f"{plan.slots_per_rank} slots; this is rank {self.rank} "
                    f"with {slots} slots"
                )
        with self._cond:
            if self._active is not None:
                raise RuntimeError(
                    f"job {self._active.job_id} is still in flight; cancel it or "
                    "commit all its layers before submitting another"
                )
            if self._thread.stop_event.is_set() or not self.is_alive():
                raise RuntimeError("the staging worker is not running")
            # Weights written on the caller's stream so far (loading, earlier
            # commits) must be final before the worker reads them.
            ready = self.backend.new_event()
            self.backend.record_event(ready)
            layers = sorted(plans)
            job = _Job(
                self,
                job_id,
                layers,
                dict(plans),
                ready,
                allowed=self.buffer.ring_size,
                maps=maps,
                new_rows={k: v.to("cpu") for k, v in (new_rows or {}).items()},
            )
            self._error = None
            self.stats = StagingStats(job_id=job_id)
            if layers:
                self._active = job
                self._thread.queue.append(job)
            self._cond.notify_all()

    def staged_layers(self) -> list[int]:
        """Layers staged (device copies finished) and not yet committed."""
        with self._cond:
            job = self._active
            if job is None:
                return []
            return list(self._done_layers(job))

    def _done_layers(self, job: _Job) -> tuple[int, ...]:
        """``job``'s staged layers whose device work is done (lock held)."""
        done = self.backend.event_done
        return tuple(sorted(i for i, s in job.staged.items() if done(s.event)))

    def commit_layer(
        self,
        layer: int,
        maps: ExpertMaps,
        new_row: torch.Tensor | None = None,
        *,
        wake: bool = True,
    ) -> None:
        """Copy ``layer``'s staged rows into the workspace, commit its maps.

        Runs on the caller's (forward) stream. Only changed slots are copied,
        each run of consecutive slots as one slice copy; the staging thread
        made the slices beforehand, so this launches the copies in one call
        (``copy_rows``) and the map rows in another. ``new_row`` may be
        left out when the job was submitted with ``new_rows``: the maps
        prepared while staging are then committed with device copies only.
        ``wake=False``: the staging thread learns of the freed slot only at
        :meth:`wake`, which the engine calls at the end of its step.
        """
        with self._cond:
            job = self._active
            if job is None or layer not in job.staged:
                raise RuntimeError(f"layer {layer} is not staged in the current job")
            staged = job.staged[layer]
        prepared = staged.prepared
        if new_row is not None:
            maps.commit_layer(layer, new_row)  # validates first: raises, no change
        elif prepared is None:
            raise ValueError(
                f"layer {layer} has no prepared maps: pass new_row, or submit "
                "the job with maps and new_rows"
            )
        elif maps is not job.maps:
            raise ValueError(
                f"layer {layer}'s maps were prepared for the maps of its job, "
                "not for the maps given"
            )
        backend = self.backend
        stream = backend.current_stream()  # looked up once: host time counts here
        backend.wait_event(staged.event, stream)
        if new_row is None:
            torch._foreach_copy_(staged.map_rows, staged.map_values, non_blocking=True)
        copy_rows(staged.dst, staged.src)
        backend.record_event(staged.released, stream)
        with self._cond:
            del job.staged[layer]
            job.committed += 1
            job.allowed += 1
            self._free_slots.append((staged.ring_slot, staged.released))
            if job.committed == len(job.layers):
                self._active = None
            self._wake_pending = not wake
            if wake:
                self._cond.notify_all()

    def wake(self) -> None:
        """Let the staging thread see the commits made with ``wake=False``.

        Woken inside the engine's step, it would stage the next layer at once
        and take the GIL from the rest of the step (measured on the H200s:
        steps with a commit waited up to 0.8 ms for it); woken at the step's
        end, it runs beside the forward pass, which releases the GIL.
        """
        if self._wake_pending:
            with self._cond:
                self._wake_pending = False
                self._cond.notify_all()

    def cancel(self) -> None:
        """Drop the uncommitted rest of the job; committed layers stay."""
        with self._cond:
            job = self._active
            if job is None:
                return
            self._drop(job)
            self._cond.notify_all()

    def _drop(self, job: _Job) -> None:
        """Forget ``job``'s staged layers (caller holds the lock)."""
        job.cancelled = True
        for staged in job.staged.values():
            self._free_slots.append((staged.ring_slot, staged.event))
        job.staged.clear()
        if self._active is job:
            self._active = None

    # ---- on the staging thread ----------------------------------------------

    def _stage(
        self,
        job: _Job,
        layer: int,
        ring_slot: int,
        free_event: object,
        tag_space: int | None,
    ) -> None:
        """Stage one layer of this model's ``job`` (called by the thread)."""
        start = time.perf_counter()
        backend = self.backend
        try:
            if tag_space is not None:  # the job's first layer
                backend.synchronize_event(job.ready_event)
                self.transport.prepare_job(tag_space)
            backend.wait_event(free_event)
            self._thread.pause()
            kit = self._commit_kit(job, layer, ring_slot)
            self._thread.pause()
            received = self.transport.stage_layer(
                job.plans[layer],
                self.rank,
                self.expert_weights[layer],
                self.buffer.slot(ring_slot),
                packed=self.buffer.packed(ring_slot),
            )
            backend.record_event(kit.event)
            backend.synchronize_event(kit.event)
            self._thread.pause()
        except Exception as exc:
            peers = exc.peers if isinstance(exc, TransferError) else ()
            error = StagingError(layer, peers, exc)
            error.__cause__ = exc
            # Logged once, by the main thread, if it concerns a live job.
            logger.debug("%s", error)
            with self._cond:
                self._error = error
                self._free_slots.append((ring_slot, None))
                self._drop(job)
                queue = self._thread.queue
                if queue and queue[0] is job:
                    queue.popleft()  # its peers may be gone: no draining
                self._cond.notify_all()
            return
        with self._cond:
            if self.stats.job_id == job.job_id:
                self.stats.layer_seconds[layer] = time.perf_counter() - start
                self.stats.layer_bytes[layer] = received
            if job.cancelled:
                self._free_slots.append((ring_slot, kit.event))
            else:
                job.staged[layer] = kit
            self._cond.notify_all()

    def _commit_kit(self, job: _Job, layer: int, ring_slot: int) -> _StagedLayer:
        """The layer's prepared maps and its commit's copies (staging thread).

        The maps are derived and copied to the device on the staging stream,
        before the transfer; the event recorded after the transfer covers both.
        """
        backend = self.backend
        prepared, map_rows, map_values, dst, src = None, [], [], [], []
        if job.maps is not None:
            prepared = job.maps.prepare_layer(job.new_rows[layer])
            map_rows, map_values = job.maps.prepared_copies(layer, prepared)
        changed = job.plans[layer].ranks[self.rank].changed_slots
        staging = self.buffer.slot(ring_slot)
        for d, s, n in slot_runs(changed, changed):
            for dst_t, src_t in zip(self.expert_weights[layer], staging, strict=True):
                dst.append(dst_t[d : d + n])
                src.append(src_t[s : s + n])
        return _StagedLayer(
            ring_slot,
            backend.new_event(),
            prepared,
            map_rows,
            map_values,
            *by_dtype(dst, src),
            backend.new_event(),
        )
