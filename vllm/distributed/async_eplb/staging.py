"""The staging buffer: one layer's local experts, allocated once.

All weight tensors of a layer are interleaved per expert in one byte buffer
``[ring, S, row_bytes]``: row ``s`` holds expert slot ``s`` of every tensor
back to back. A transport can then receive several experts of one peer, all
tensors included, as one message straight into consecutive rows, and
:meth:`StagingBuffer.slot` still hands out per-tensor views with the weights'
shapes and dtypes.
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
    """``ring_size`` slots, each holding one layer's local experts."""

    def __init__(
        self,
        layer_weights: Sequence[torch.Tensor],
        backend: DeviceBackend,
        ring_size: int = 1,
    ) -> None:
        if ring_size < 1:
            raise ValueError(f"ring_size must be >= 1, got {ring_size}")
        self.layout = RowLayout.of(layer_weights)
        self.num_slots_per_rank = layer_weights[0].shape[0]
        self.ring_size = ring_size
        self.backend = backend
        self._packed = torch.empty(
            (ring_size, self.num_slots_per_rank, self.layout.row_bytes),
            dtype=torch.uint8,
            device=backend.device,
        )
        self._views = [self.layout.views(self._packed[i]) for i in range(ring_size)]

    def slot(self, i: int) -> list[torch.Tensor]:
        """Per-tensor views ``[S, ...]`` of ring slot ``i`` (weights' dtypes)."""
        return self._views[self._check(i)]

    def packed(self, i: int) -> torch.Tensor:
        """Ring slot ``i`` as ``[S, row_bytes]`` uint8 (one row per expert slot)."""
        return self._packed[self._check(i)]

    @property
    def nbytes(self) -> int:
        return self._packed.numel()

    def _check(self, i: int) -> int:
        if not 0 <= i < self.ring_size:
            raise ValueError(f"ring slot {i} is out of range [0, {self.ring_size})")
        return i


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
