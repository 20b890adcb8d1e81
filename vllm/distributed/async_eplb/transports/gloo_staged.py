"""Point-to-point staging over gloo, through pinned host memory.

The CPU default and the fallback where device collectives are unsafe or
missing. On CPU the messages go straight from and to the packed rows (see
``P2PTransport``: receives posted first, sends as soon as packed); on a device
they are copied to and from pinned host rows on the worker's stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.transports.p2p import Message, P2PTransport

__all__ = ["GlooStagedTransport"]


class GlooStagedTransport(P2PTransport):
    name = "gloo-staged"

    def __init__(self, backend: DeviceBackend, group: Any, *, timeout: float) -> None:
        group_backend = str(dist.get_backend(group))
        if "gloo" not in group_backend:
            raise ValueError(
                f"transport 'gloo-staged' needs a gloo group, got {group_backend!r}"
            )
        super().__init__(backend, group, timeout=timeout)
        self._host = torch.empty(0, dtype=torch.uint8)

    def _run(self, messages: Sequence[Message], tag: int) -> None:
        if self.backend.is_synchronous:
            super()._run(messages, tag)
            return
        total = sum(m.rows.numel() for m in messages)
        if self._host.numel() < total:
            self._host = self.backend.empty_pinned((total,), torch.uint8)
        host_messages = []
        offset = 0
        for m in messages:
            host = self._host[offset : offset + m.rows.numel()].view(m.rows.shape)
            offset += m.rows.numel()
            if m.is_send:
                host.copy_(m.rows, non_blocking=True)
            host_messages.append(Message(m.is_send, m.peer, host))
        # Packing copies (and the previous layer's reads of the host rows)
        # must be finished before gloo touches host memory.
        self.backend.synchronize_stream(self.backend.current_stream())
        super()._run(host_messages, tag)
        for m, host in zip(messages, host_messages, strict=True):
            if not m.is_send:
                m.rows.copy_(host.rows, non_blocking=True)
