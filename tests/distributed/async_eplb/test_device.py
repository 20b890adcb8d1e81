"""CPU device backend, staging buffer layout and slot-run copies."""

from __future__ import annotations

import pytest
import torch

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.staging import (
    RowLayout,
    StagingBuffer,
    copy_slot_runs,
    slot_runs,
)


def layer_weights(num_slots: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [
        torch.randn(num_slots, 3, 4),
        torch.randn(num_slots, 7).to(torch.bfloat16),
        torch.randint(0, 255, (num_slots, 6), dtype=torch.uint8),
    ]


def test_cpu_backend_is_synchronous_no_op() -> None:
    backend = DeviceBackend.for_device("cpu")
    assert backend.device == torch.device("cpu") and backend.is_synchronous
    stream = backend.new_stream(priority=-1)
    event = backend.new_event()
    assert stream is None and event is None and backend.current_stream() is None
    with backend.stream(stream):
        backend.record_event(event)
        backend.wait_event(event, stream)
    assert backend.event_done(event)
    backend.synchronize()
    pinned = backend.empty_pinned((2, 3), torch.bfloat16)
    assert pinned.shape == (2, 3) and pinned.dtype == torch.bfloat16


def test_unsupported_devices_are_named() -> None:
    with pytest.raises(ValueError, match="'meta'"):
        DeviceBackend.for_device("meta")
    with pytest.raises(ValueError, match="IPC handles need a CUDA device"):
        DeviceBackend.for_device("cpu").ipc_handle(torch.zeros(1))


def test_staging_views_have_weight_shapes_and_are_disjoint() -> None:
    weights = layer_weights()
    buf = StagingBuffer(weights, DeviceBackend.for_device("cpu"), ring_size=2)
    assert buf.nbytes == 2 * 5 * buf.layout.row_bytes
    assert buf.layout.row_bytes % 16 == 0
    for ring in range(2):
        views = buf.slot(ring)
        for view, w in zip(views, weights, strict=True):
            assert view.shape == w.shape and view.dtype == w.dtype
            view.copy_(w)
    for view, w in zip(buf.slot(0), weights, strict=True):
        assert torch.equal(view.view(torch.uint8), w.view(torch.uint8))
    # A packed row carries every tensor of one expert slot.
    row = buf.packed(1)[3:4]
    parts = RowLayout.of(weights).views(row.clone())
    for part, w in zip(parts, weights, strict=True):
        assert torch.equal(part[0], w[3])
    with pytest.raises(ValueError, match="ring slot 2"):
        buf.slot(2)


def test_staging_by_tensor_keeps_each_tensor_contiguous() -> None:
    weights = layer_weights()
    buf = StagingBuffer(
        weights, DeviceBackend.for_device("cpu"), ring_size=2, by_tensor=True
    )
    assert buf.by_tensor and buf.packed(0) is None
    for ring in range(2):
        for view, w in zip(buf.slot(ring), weights, strict=True):
            assert view.shape == w.shape and view.dtype == w.dtype
            assert view.is_contiguous()
            assert view.data_ptr() % 16 == 0
    # Every byte of one ring slot belongs to exactly one view.
    for ring, value in ((0, 0x11), (1, 0x22)):
        for view in buf.slot(ring):
            view.view(torch.uint8).fill_(value)
    for ring, value in ((0, 0x11), (1, 0x22)):
        for view in buf.slot(ring):
            assert bool((view.view(torch.uint8) == value).all())
    # A run of slots of one tensor is one contiguous range; the rest is kept.
    run = buf.slot(1)[1][2:5]
    assert run.is_contiguous()
    run.copy_(weights[1][0:3])
    assert torch.equal(buf.slot(1)[1][2:5], weights[1][0:3])
    assert bool((buf.slot(0)[1].view(torch.uint8) == 0x11).all())
    rows = StagingBuffer(weights, DeviceBackend.for_device("cpu"))
    assert not rows.by_tensor and rows.packed(0) is not None


def test_staging_rejects_mismatched_tensors() -> None:
    with pytest.raises(ValueError, match=r"weight tensor 1 has shape \(4, 2\)"):
        StagingBuffer(
            [torch.zeros(5, 2), torch.zeros(4, 2)], DeviceBackend.for_device("cpu")
        )
    with pytest.raises(ValueError, match="ring_size must be >= 1, got 0"):
        StagingBuffer(layer_weights(), DeviceBackend.for_device("cpu"), ring_size=0)


def test_slot_runs_merge_consecutive_pairs() -> None:
    assert slot_runs([4, 0, 1, 2, 6], [9, 3, 4, 5, 7]) == [
        (0, 3, 3),
        (4, 9, 1),
        (6, 7, 1),
    ]
    assert slot_runs([], []) == []
    src = [torch.arange(10.0).view(5, 2)]
    dst = [torch.zeros(5, 2)]
    copy_slot_runs(dst, src, slot_runs([1, 2, 4], [0, 1, 3]))
    assert dst[0].tolist() == [[0, 0], [0, 1], [2, 3], [0, 0], [6, 7]]
