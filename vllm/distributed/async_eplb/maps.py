"""The three views of an expert placement, and their in-place commit.

- ``phy2log [L, P]``: physical slot -> logical expert (the source of truth);
- ``log2phy [L, E, K]``: logical expert -> its physical slots in ascending
  order, padded with -1; K is the most replicas any expert may have
  (``num_redundant_experts + 1``), not vLLM's fixed 1024;
- ``logcnt [L, E]``: number of replicas of each logical expert.

Everything here is pure: no process group, no device beyond the tensors given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "UNUSED_SLOT",
    "ExpertMaps",
    "LayerMaps",
    "commit_layer_maps",
    "compute_logical_maps",
    "derive_logical_maps",
    "max_replicas_for",
    "validate_placement",
]


UNUSED_SLOT = -1
"""A physical slot that holds no expert (vLLM pads elastic-EP capacity so)."""


def max_replicas_for(num_redundant_experts: int) -> int:
    """Width K of ``log2phy``: one expert can hold all redundant slots plus its own."""
    if num_redundant_experts < 0:
        raise ValueError(
            f"num_redundant_experts must be >= 0, got {num_redundant_experts}"
        )
    return num_redundant_experts + 1


def validate_placement(
    phy2log: torch.Tensor,
    num_logical_experts: int,
    num_ranks: int | None = None,
    max_replicas: int | None = None,
    allow_unused: bool = False,
) -> None:
    """Raise ``ValueError`` naming the first bad value of a placement.

    Checks: 1-D or 2-D integer tensor; ids in ``[0, E)`` (or ``UNUSED_SLOT``
    with ``allow_unused``); every logical expert has a replica in every
    layer; ``P`` divisible by ``num_ranks``; no expert holds more than
    ``max_replicas`` slots.
    """
    if not isinstance(phy2log, torch.Tensor):
        raise ValueError(f"phy2log must be a torch.Tensor, got {type(phy2log)!r}")
    if phy2log.dim() not in (1, 2):
        raise ValueError(
            f"phy2log must have shape [L, P] or [P], got {tuple(phy2log.shape)}"
        )
    if phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
        raise ValueError(f"phy2log must hold integer ids, got dtype {phy2log.dtype}")
    if num_logical_experts <= 0:
        raise ValueError(f"num_logical_experts must be > 0, got {num_logical_experts}")
    rows = phy2log.reshape(-1, phy2log.shape[-1]).to("cpu", torch.int64)
    num_physical = rows.shape[1]
    if num_physical < num_logical_experts:
        raise ValueError(
            f"{num_physical} physical slots cannot hold "
            f"{num_logical_experts} logical experts"
        )
    if num_ranks is not None:
        if num_ranks <= 0:
            raise ValueError(f"num_ranks must be > 0, got {num_ranks}")
        if num_physical % num_ranks != 0:
            raise ValueError(
                f"{num_physical} physical slots are not divisible by {num_ranks} ranks"
            )
    bad = (rows < 0) | (rows >= num_logical_experts)
    if allow_unused:
        bad &= rows != UNUSED_SLOT
    if bad.any():
        layer, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"phy2log[{layer}, {slot}] = {int(rows[layer, slot])} is not a logical "
            f"expert id in [0, {num_logical_experts})"
        )
    counts = _replica_counts(rows, num_logical_experts)
    missing = counts == 0
    if missing.any():
        layer, expert = (int(i) for i in missing.nonzero()[0])
        raise ValueError(
            f"logical expert {expert} has no physical replica in layer {layer}"
        )
    if max_replicas is not None and int(counts.max()) > max_replicas:
        layer, expert = (int(i) for i in (counts > max_replicas).nonzero()[0])
        raise ValueError(
            f"logical expert {expert} of layer {layer} has "
            f"{int(counts[layer, expert])} replicas, more than the "
            f"{max_replicas} the maps allow"
        )


def _replica_counts(rows: torch.Tensor, num_logical_experts: int) -> torch.Tensor:
    """Replicas per expert; ``UNUSED_SLOT`` entries are not counted."""
    used = rows != UNUSED_SLOT
    counts = torch.zeros(
        rows.shape[0], num_logical_experts, dtype=torch.int64, device=rows.device
    )
    counts.scatter_add_(1, rows.clamp_min(0), used.to(torch.int64))
    return counts


def derive_logical_maps(
    phy2log: torch.Tensor,
    num_logical_experts: int,
    max_replicas: int,
    allow_unused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(log2phy [.., E, K], logcnt [.., E])`` for a valid ``phy2log``.

    Replicas are listed in ascending physical order, as vLLM lists them.
    Accepts ``[L, P]`` or one layer ``[P]``; the outputs follow its leading dim.
    With ``allow_unused``, ``UNUSED_SLOT`` slots are skipped.
    """
    validate_placement(
        phy2log,
        num_logical_experts,
        max_replicas=max_replicas,
        allow_unused=allow_unused,
    )
    squeeze = phy2log.dim() == 1
    rows = phy2log.reshape(-1, phy2log.shape[-1]).to(torch.int64)
    logcnt = _replica_counts(rows, num_logical_experts)
    # Unused slots become a last, extra expert, dropped at the end.
    rows = torch.where(rows == UNUSED_SLOT, num_logical_experts, rows)
    num_layers, num_physical = rows.shape
    with_unused = torch.cat([logcnt, (rows == num_logical_experts).sum(1, True)], 1)
    # Rank of each slot among the slots of the same expert, in physical order:
    # a stable sort by expert groups slots of one expert, still ascending.
    order = torch.sort(rows, dim=1, stable=True).indices
    sorted_experts = torch.gather(rows, 1, order)
    first_of_expert = torch.cumsum(with_unused, dim=1) - with_unused
    position = torch.arange(num_physical, device=rows.device).expand(num_layers, -1)
    replica_rank = position - torch.gather(first_of_expert, 1, sorted_experts)
    # Room for every unused slot in the extra row (no device sync to count).
    width = max(max_replicas, num_physical) if allow_unused else max_replicas
    log2phy = torch.full(
        (num_layers, num_logical_experts + 1, width),
        -1,
        dtype=torch.int64,
        device=rows.device,
    )
    flat = (sorted_experts * width + replica_rank).reshape(num_layers, -1)
    log2phy.view(num_layers, -1).scatter_(1, flat, order)
    log2phy = log2phy[:, :num_logical_experts, :max_replicas].contiguous()
    if squeeze:
        return log2phy[0], logcnt[0]
    return log2phy, logcnt


def compute_logical_maps(
    phy2log: torch.Tensor, num_logical_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``compute_logical_maps``: K is the most replicas any expert has,
    and ``UNUSED_SLOT`` slots are allowed (and skipped)."""
    rows = phy2log.reshape(-1, phy2log.shape[-1]).to(torch.int64)
    most = int(_replica_counts(rows, num_logical_experts).max()) if rows.numel() else 1
    return derive_logical_maps(
        phy2log, num_logical_experts, max(1, most), allow_unused=True
    )


def commit_layer_maps(
    phy2log: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    layer: int,
    new_layer_phy2log: torch.Tensor,
) -> None:
    """Write one layer's new placement into existing map tensors, in place.

    The storage of all three tensors is kept (CUDA graphs captured against them
    stay valid). The new row is validated first, so a bad row changes nothing.
    """
    num_layers, num_physical = phy2log.shape
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is out of range [0, {num_layers})")
    if tuple(new_layer_phy2log.shape) != (num_physical,):
        raise ValueError(
            f"new phy2log row has shape {tuple(new_layer_phy2log.shape)}, "
            f"expected ({num_physical},)"
        )
    new_log2phy, new_logcnt = derive_logical_maps(
        new_layer_phy2log.to("cpu"), logcnt.shape[1], log2phy.shape[2]
    )
    phy2log[layer].copy_(new_layer_phy2log)
    log2phy[layer].copy_(new_log2phy)
    logcnt[layer].copy_(new_logcnt)


@dataclass(frozen=True)
class LayerMaps:
    """One layer's new maps, validated and already on the maps' device.

    Prepared off the forward path (by the staging worker), so that a commit is
    three device-to-device copies: no host work and no pageable host copy,
    which would block the host until the forward stream drained.
    """

    phy2log: torch.Tensor  # [P]
    log2phy: torch.Tensor  # [E, K]
    logcnt: torch.Tensor  # [E]


class ExpertMaps:
    """The maps of one model, allocated once; layers are committed in place."""

    def __init__(
        self,
        phy2log: torch.Tensor,
        num_logical_experts: int,
        max_replicas: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if phy2log.dim() != 2:
            raise ValueError(
                f"phy2log must have shape [L, P], got {tuple(phy2log.shape)}"
            )
        log2phy, logcnt = derive_logical_maps(
            phy2log, num_logical_experts, max_replicas
        )
        self.phy2log = phy2log.to(device=device, dtype=torch.int64).clone()
        self.log2phy = log2phy.to(device)
        self.logcnt = logcnt.to(device)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical_experts(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_logical_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def max_replicas(self) -> int:
        return self.log2phy.shape[2]

    def commit_layer(self, layer: int, new_layer_phy2log: torch.Tensor) -> None:
        commit_layer_maps(
            self.phy2log, self.log2phy, self.logcnt, layer, new_layer_phy2log
        )

    def prepare_layer(self, new_layer_phy2log: torch.Tensor) -> LayerMaps:
        """Validate and derive one layer's maps, copied to the maps' device.

        Call it on a side stream; the copies are ordered on the current stream
        and from pinned memory, so the caller records an event after them.
        """
        if tuple(new_layer_phy2log.shape) != (self.num_physical_experts,):
            raise ValueError(
                f"new phy2log row has shape {tuple(new_layer_phy2log.shape)}, "
                f"expected ({self.num_physical_experts},)"
            )
        row = new_layer_phy2log.to("cpu", torch.int64)
        log2phy, logcnt = derive_logical_maps(
            row, self.num_logical_experts, self.max_replicas
        )
        device = self.phy2log.device
        pin = device.type != "cpu"
        return LayerMaps(
            *(
                (t.pin_memory() if pin else t.clone()).to(device, non_blocking=True)
                for t in (row, log2phy, logcnt)
            )
        )

    def prepared_copies(
        self, layer: int, prepared: LayerMaps
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``layer``'s rows of the three maps (views, same storage) and
        ``prepared``'s values for them: a commit copies the second into the
        first. The staging worker makes them before the commit's step."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range [0, {self.num_layers})")
        rows = [self.phy2log[layer], self.log2phy[layer], self.logcnt[layer]]
        return rows, [prepared.phy2log, prepared.log2phy, prepared.logcnt]

    def commit_prepared(self, layer: int, prepared: LayerMaps) -> None:
        """Write prepared maps into ``layer`` in place (same storage)."""
        rows, values = self.prepared_copies(layer, prepared)
        torch._foreach_copy_(rows, values, non_blocking=True)
