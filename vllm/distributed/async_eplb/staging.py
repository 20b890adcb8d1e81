"""The staging buffer: one layer's local experts, allocated once.

Two layouts of one ring slot's bytes, both handing out per-tensor views with
the weights' shapes and dtypes (:meth:`StagingBuffer.slot`):

- by expert: the layer's tensors interleaved per expert, ``[S, row_bytes]``
  rows where row ``s`` holds expert slot ``s`` of every tensor back to back.
  gloo, which pays per message, then receives several experts of one peer,
  all tensors included, as one message straight into consecutive rows
  (:meth:`StagingBuffer.packed`). The CPU default.
- by tensor: each tensor's ``S`` rows contiguous, one tensor after another,
  as the workspace holds them. A run of experts of one tensor is then one
  contiguous range on both sides: NCCL sends it as one message and a CUDA
  IPC pull is one memcpy, where the interleaved rows need one message or a
  strided copy per expert and tensor. The default on accelerators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm.distributed.async_eplb.device import DeviceBackend

__all__ = ["RowLayout", "StagingBuffer", "copy_slot_runs", "slot_runs"]

_ALIGN = 16  # bytes; keeps every dtype view aligned


@dataclass(frozen=True)
class RowLayout:
    """Where each weight tensor's expert row sits inside one packed row."""

    shapes: tuple[tuple[int, ...], ...]  # per tensor, without the slot dim
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]  # bytes
    row_bytes: int

    @classmethod
    def of(cls, layer_weights: Sequence[torch.Tensor]) -> RowLayout:
        if not layer_weights:
            raise ValueError("a layer needs at least one expert weight tensor")
        num_slots = layer_weights[0].shape[0]
        shapes, dtypes, offsets = [], [], []
        offset = 0
        for i, w in enumerate(layer_weights):
            if w.dim() < 1 or w.shape[0] != num_slots:
                raise ValueError(
                    f"weight tensor {i} has shape {tuple(w.shape)}; every tensor "
                    f"must lead with the {num_slots} local expert slots"
                )
            shapes.append(tuple(w.shape[1:]))
            dtypes.append(w.dtype)
            offsets.append(offset)
            nbytes = w[0].numel() * w.element_size()
            offset += -(-nbytes // _ALIGN) * _ALIGN
        return cls(tuple(shapes), tuple(dtypes), tuple(offsets), max(offset, _ALIGN))

    def views(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Per-tensor views ``[n, *shape]`` of a packed ``[n, row_bytes]`` uint8."""
        out = []
        for shape, dtype, offset in zip(
            self.shapes, self.dtypes, self.offsets, strict=True
        ):
            itemsize = torch.empty((), dtype=dtype).element_size()
            numel = 1
            for d in shape:
                numel *= d
            part = packed[:, offset : offset + numel * itemsize].view(dtype)
            out.append(part.view(packed.shape[0], *shape))
        return out


class StagingBuffer:
    """``ring_size`` slots, each holding one layer's local experts.

    ``by_tensor`` picks the layout (see the module docstring); ``None``: by
    tensor on an accelerator, by expert on CPU.
    """

    def __init__(
        self,
        layer_weights: Sequence[torch.Tensor],
        backend: DeviceBackend,
        ring_size: int = 1,
        *,
        by_tensor: bool | None = None,
    ) -> None:
        if ring_size < 1:
            raise ValueError(f"ring_size must be >= 1, got {ring_size}")
        self.layout = RowLayout.of(layer_weights)
        self.num_slots_per_rank = layer_weights[0].shape[0]
        self.ring_size = ring_size
        self.backend = backend
        if by_tensor is None:
            by_tensor = not backend.is_synchronous
        self.by_tensor = by_tensor
        num = self.num_slots_per_rank
        if by_tensor:
            spans = _tensor_spans(self.layout, num)
            end = spans[-1][0] + spans[-1][1]
            slot_bytes = max(-(-end // _ALIGN) * _ALIGN, _ALIGN)
        else:
            slot_bytes = num * self.layout.row_bytes
        # The buffer's bytes, one row per ring slot.
        self._packed = torch.empty(
            (ring_size, slot_bytes), dtype=torch.uint8, device=backend.device
        )
        if by_tensor:
            self._views = [
                [
                    self._packed[i, start : start + nbytes]
                    .view(dtype)
                    .view(num, *shape)
                    for (start, nbytes), shape, dtype in zip(
                        spans, self.layout.shapes, self.layout.dtypes, strict=True
                    )
                ]
                for i in range(ring_size)
            ]
        else:
            self._views = [self.layout.views(self._rows(i)) for i in range(ring_size)]

    def slot(self, i: int) -> list[torch.Tensor]:
        """Per-tensor views ``[S, ...]`` of ring slot ``i`` (weights' dtypes)."""
        return self._views[self._check(i)]

    def packed(self, i: int) -> torch.Tensor | None:
        """Ring slot ``i`` as ``[S, row_bytes]`` uint8 rows (one per expert
        slot); ``None`` when the buffer is laid out by tensor."""
        i = self._check(i)
        return None if self.by_tensor else self._rows(i)

    @property
    def nbytes(self) -> int:
        return self._packed.numel()

    def _rows(self, i: int) -> torch.Tensor:
        return self._packed[i].view(self.num_slots_per_rank, self.layout.row_bytes)

    def _check(self, i: int) -> int:
        if not 0 <= i < self.ring_size:
            raise ValueError(f"ring slot {i} is out of range [0, {self.ring_size})")
        return i


def _tensor_spans(layout: RowLayout, num_slots: int) -> list[tuple[int, int]]:
    """``(start, nbytes)`` of each tensor's ``num_slots`` rows, laid end to end
    (starts aligned)."""
    spans, start = [], 0
    for shape, dtype in zip(layout.shapes, layout.dtypes, strict=True):
        numel = 1
        for d in shape:
            numel *= d
        nbytes = num_slots * numel * torch.empty((), dtype=dtype).element_size()
        spans.append((start, nbytes))
        start += -(-nbytes // _ALIGN) * _ALIGN
    return spans


def slot_runs(
    dst_slots: Sequence[int], src_slots: Sequence[int]
) -> list[tuple[int, int, int]]:
    """Group ``(dst, src)`` pairs into ``(dst_start, src_start, length)`` runs.

    Consecutive pairs where both sides advance by one become one slice copy:
    one big copy is far cheaper than many row copies or an ``index_copy_``.
    """
    runs: list[tuple[int, int, int]] = []
    for dst, src in sorted(zip(dst_slots, src_slots, strict=True)):
        if runs:
            d0, s0, n = runs[-1]
            if dst == d0 + n and src == s0 + n:
                runs[-1] = (d0, s0, n + 1)
                continue
        runs.append((dst, src, 1))
    return runs


def copy_slot_runs(
    dst: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    runs: Sequence[tuple[int, int, int]],
) -> None:
    """``dst[t][d:d+n] = src[t][s:s+n]`` for every tensor and run."""
    for dst_t, src_t in zip(dst, src, strict=True):
        for d, s, n in runs:
            dst_t[d : d + n].copy_(src_t[s : s + n], non_blocking=True)
