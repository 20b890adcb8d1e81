"""Replica consistency: does every replica hold its logical expert's bytes?

The maps say which logical expert each physical slot holds; nothing in vLLM
checks that the weights agree. A loader that fills only the primary slots
(vLLM 0.32/0.33's ``DeepSeekMTP.load_weights`` builds its expert mapping
without ``num_redundant_experts``) leaves redundant slots holding whatever
was there, and every token routed to them is computed with wrong weights.

Pure parts, no process group: a per-slot digest computed on the weights'
own device (only ``[slots]`` integers ever reach the host), the comparison
of every replica with its expert's primary (its lowest physical slot), the
source row that lets the transfer planner heal stale slots, and the warning
text.

How the digest works, and how it could collide: each expert row of each
tensor is read as 32-bit words (bytes when the row's size is not a multiple
of 4) ``w_i``; its digest is ``sum_i w_i * m_i`` modulo ``2**64`` with odd
position-dependent multipliers ``m_i = a[i % 4096] * b[i // 4096]`` (fixed
pseudo-random tables), and the tensors of a slot are combined with odd
per-tensor factors. Identical bytes always give identical digests on every
device (integer sums wrap and are order-independent), so a healthy replica is
never reported. A change of one word is always detected (an odd multiplier
times a nonzero 32-bit difference is nonzero modulo ``2**64``); several
changed words go unnoticed only if their differences cancel modulo ``2**64``
under the multipliers, which unrelated contents (a stale slot, dummy or
zeroed weights, another expert) do with a chance of about ``2**-32`` or
less. It is a checksum against accidents, not a cryptographic hash: contents
built to collide could pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "StaleReplica",
    "describe_stale",
    "expected_digests",
    "find_stale_replicas",
    "primary_slots",
    "slot_digests",
    "source_row",
    "weights_digests",
]

_BLOCK = 4096
"""Words per block of the two-level multipliers (``a`` has this many)."""
CHUNK_ELEMENTS = 1 << 24
"""Words digested per kernel: bounds the temporary int64 memory (128 MiB).

Kernel launches dominate below this: on an H200, a DeepSeek-V3 rank's 23 GB
digest in 0.151 s with 2**22 words, 0.068 s with 2**24, 0.063 s with 2**25."""
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """A 64-bit integer mixer (multiply, xor-shift), deterministic everywhere."""
    x = (x * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK
    return x ^ (x >> 32)


def _signed(x: int) -> int:
    """``x`` modulo ``2**64`` as the int64 with the same bits."""
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


class _Multipliers:
    """The tables ``a`` (odd, 31 bits: ``w * a`` never overflows) and ``b``
    (odd, 64 bits), cached per device; ``b`` grows with the longest row."""

    def __init__(self) -> None:
        self._a: dict[torch.device, torch.Tensor] = {}
        self._b: dict[torch.device, torch.Tensor] = {}

    def a(self, device: torch.device) -> torch.Tensor:
        table = self._a.get(device)
        if table is None:
            values = [(_mix(i) & 0x7FFFFFFF) | 1 for i in range(_BLOCK)]
            table = torch.tensor(values, dtype=torch.int64, device=device)
            self._a[device] = table
        return table

    def b(self, device: torch.device, length: int) -> torch.Tensor:
        table = self._b.get(device)
        if table is None or table.numel() < length:
            size = max(length, 2 * (0 if table is None else table.numel()), 64)
            values = [_signed(_mix(i + (1 << 40)) | 1) for i in range(size)]
            table = torch.tensor(values, dtype=torch.int64, device=device)
            self._b[device] = table
        return table


_TABLES = _Multipliers()


def _tensor_factor(index: int) -> int:
    """Odd factor of the ``index``-th tensor of a slot (order matters)."""
    return _signed(_mix(index + (1 << 50)) | 1)


def _byte_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor [S, ...]`` as ``[S, row_bytes]`` uint8, a view where possible."""
    flat = tensor.reshape(tensor.shape[0], -1)
    if flat.shape[1] and flat.stride(-1) != 1:
        flat = flat.contiguous()
    return flat.view(torch.uint8)


def _as_words(raw: torch.Tensor, word: int) -> torch.Tensor:
    """``[S, n * word]`` bytes as ``[S, n]`` words (int32 when ``word`` is 4)."""
    if word == 1:
        return raw
    try:
        return raw.view(torch.int32)
    except RuntimeError:  # storage not 4-byte aligned: a bounded copy
        return raw.clone().view(torch.int32)


def _tensor_digests(tensor: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """``[S]`` int64: the digest of each slot's row of one tensor."""
    raw = _byte_rows(tensor)
    num_slots, nbytes = raw.shape
    acc = torch.zeros(num_slots, dtype=torch.int64, device=tensor.device)
    if nbytes == 0 or num_slots == 0:
        return acc
    word = 4 if nbytes % 4 == 0 else 1
    num_words = nbytes // word
    full_blocks, tail = divmod(num_words, _BLOCK)
    a = _TABLES.a(tensor.device)
    b = _TABLES.b(tensor.device, full_blocks + 1)
    step = max(1, chunk_elements // (num_slots * _BLOCK))
    for j0 in range(0, full_blocks, step):
        j1 = min(full_blocks, j0 + step)
        words = _as_words(raw[:, j0 * _BLOCK * word : j1 * _BLOCK * word], word)
        # Widened first: int32 * int64 broadcasting is several times slower.
        wide = words.view(num_slots, j1 - j0, _BLOCK).to(torch.int64)
        partial = wide.mul_(a).sum(-1)
        acc += (partial * b[j0:j1]).sum(-1)
    if tail:
        words = _as_words(raw[:, full_blocks * _BLOCK * word :], word)
        acc += words.to(torch.int64).mul_(a[:tail]).sum(-1) * b[full_blocks]
    return acc


def slot_digests(
    weights: Sequence[torch.Tensor], chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """``[S]`` int64 digests of the ``S`` slots of one layer, on its device.

    ``weights`` are the layer's ``get_expert_weights()`` tensors (or slices
    of them), each ``[S, ...]``; every tensor counts, scales and biases too.
    """
    if not weights:
        raise ValueError("a layer needs at least one expert weight tensor")
    num_slots = weights[0].shape[0]
    total = torch.zeros(num_slots, dtype=torch.int64, device=weights[0].device)
    for index, tensor in enumerate(weights):
        if tensor.dim() < 1 or tensor.shape[0] != num_slots:
            raise ValueError(
                f"weight tensor {index} has shape {tuple(tensor.shape)}; every "
                f"tensor must lead with the {num_slots} slots"
            )
        total += _tensor_digests(tensor, chunk_elements) * _tensor_factor(index)
    return total


def weights_digests(
    expert_weights: Sequence[Sequence[torch.Tensor]],
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``[L, S]`` int64 digests of every layer's local slots, on the device."""
    if not expert_weights:
        raise ValueError("expert_weights has no layers")
    return torch.stack([slot_digests(w, chunk_elements) for w in expert_weights])


# -- comparisons (host, [L, P] integers) -----------------------------------------
def _check_maps(phy2log: torch.Tensor, digests: torch.Tensor) -> None:
    if phy2log.dim() != 2 or tuple(phy2log.shape) != tuple(digests.shape):
        raise ValueError(
            f"phy2log {tuple(phy2log.shape)} and digests {tuple(digests.shape)} "
            "must both be [layers, physical slots]"
        )


def primary_slots(phy2log: torch.Tensor, num_logical: int) -> torch.Tensor:
    """``[L, E]``: the lowest physical slot of each logical expert, -1 if none.

    Slots holding ``-1`` (unused, as vLLM 0.33 allows) are nobody's.
    """
    if phy2log.dim() != 2:
        raise ValueError(f"phy2log must be [L, P], got {tuple(phy2log.shape)}")
    phy2log = phy2log.to("cpu", torch.int64)
    num_layers, num_slots = phy2log.shape
    if int(phy2log.max()) >= num_logical:
        raise ValueError(
            f"phy2log names expert {int(phy2log.max())}, but there are "
            f"{num_logical} logical experts"
        )
    valid = phy2log >= 0
    index = torch.arange(num_slots).expand(num_layers, -1)
    primary = torch.full((num_layers, num_logical + 1), num_slots, dtype=torch.int64)
    # Unused slots go to the extra column, which is dropped.
    experts = torch.where(valid, phy2log, num_logical)
    primary.scatter_reduce_(1, experts, index, reduce="amin")
    primary = primary[:, :num_logical]
    return torch.where(primary == num_slots, -1, primary)


@dataclass(frozen=True)
class StaleReplica:
    """A slot whose bytes differ from its logical expert's primary slot."""

    layer: int
    slot: int
    expert: int
    primary: int


def find_stale_replicas(
    phy2log: torch.Tensor, digests: torch.Tensor, num_logical: int
) -> list[StaleReplica]:
    """Every replica whose digest differs from its expert's primary slot's.

    ``phy2log [L, P]`` and ``digests [L, P]`` (all ranks joined). A primary
    is right by definition (it is what the loader wrote first); when it is
    itself the wrong one, its replicas are reported instead.
    """
    _check_maps(phy2log, digests)
    phy2log = phy2log.to("cpu", torch.int64)
    digests = digests.to("cpu", torch.int64)
    primary = primary_slots(phy2log, num_logical)
    valid = phy2log >= 0
    slot_primary = torch.gather(primary, 1, phy2log.clamp_min(0))
    expected = torch.gather(digests, 1, slot_primary.clamp_min(0))
    layers, slots = (valid & (digests != expected)).nonzero(as_tuple=True)
    return [
        StaleReplica(*entry)
        for entry in zip(
            layers.tolist(),
            slots.tolist(),
            phy2log[layers, slots].tolist(),
            slot_primary[layers, slots].tolist(),
            strict=True,
        )
    ]


def expected_digests(
    phy2log: torch.Tensor, digests: torch.Tensor, num_logical: int
) -> torch.Tensor:
    """``[L, E]``: each logical expert's digest (its primary slot's), CPU.

    What any slot holding the expert must digest to after a rebalance.
    Experts without a slot get 0 (no slot can be checked against them).
    """
    _check_maps(phy2log, digests)
    primary = primary_slots(phy2log, num_logical)
    found = torch.gather(digests.to("cpu", torch.int64), 1, primary.clamp_min(0))
    return torch.where(primary >= 0, found, 0)


def source_row(
    row: Sequence[int], stale_slots: Sequence[int], num_logical: int
) -> list[int]:
    """``row`` with each stale slot renamed to an expert id nobody holds.

    Planning a move from this row to ``row`` itself makes exactly the stale
    slots "changed", and sources each of their experts from the slots that
    really hold it (the primary and the healthy replicas), never from a
    stale one.
    """
    out = [int(x) for x in row]
    for index, slot in enumerate(sorted(set(stale_slots))):
        if not 0 <= slot < len(out):
            raise ValueError(f"stale slot {slot} is out of range [0, {len(out)})")
        out[slot] = num_logical + index
    return out


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for value in sorted(set(values)):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe_stale(stale: Sequence[StaleReplica]) -> str:
    """Layers and slots, compactly: ``"MoE layer 0: slots 16-17"``.

    Layers with the same stale slots are listed together, so a model whose
    loader missed the same slots in all 58 layers still gives one short line.
    """
    if not stale:
        return "none"
    by_layer: dict[int, list[int]] = {}
    for replica in stale:
        by_layer.setdefault(replica.layer, []).append(replica.slot)
    by_slots: dict[tuple[int, ...], list[int]] = {}
    for layer, slots in sorted(by_layer.items()):
        by_slots.setdefault(tuple(sorted(slots)), []).append(layer)
    parts = []
    for slots, layers in by_slots.items():
        noun = "MoE layer" if len(layers) == 1 else "MoE layers"
        slot_noun = "slot" if len(slots) == 1 else "slots"
        parts.append(f"{noun} {_ranges(layers)}: {slot_noun} {_ranges(slots)}")
    return "; ".join(parts)
