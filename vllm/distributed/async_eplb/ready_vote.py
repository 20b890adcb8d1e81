"""The "ready" vote's payload: what one rank reports, what the sum tells all.

Every step a rebalance is in flight, each rank reports a flat list of ints
(its flags, then one staged flag per MoE layer of each model); the vote sums
the lists over EP ranks and every rank decodes the same sum. Layout::

    [error, planned, skip, dead, model 0's layers..., model 1's layers...]

Pure: no process group, no torch state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ReadyReport", "ReadyTally", "decode_ready", "encode_ready"]

_HEADER = 4  # error, planned, skip, dead


@dataclass(frozen=True)
class ReadyReport:
    """One rank's report.

    ``planned``: could start staging now; ``skip``: its plan's gain is below
    the threshold; ``dead``: a staging thread of this rank died; ``staged``:
    per model, the layers staged and not yet committed.
    """

    error: bool
    planned: bool
    skip: bool
    dead: bool
    staged: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ReadyTally:
    """The vote's sum over ranks: how many ranks set each flag, and per model
    and layer how many ranks have staged it."""

    errors: int
    planned: int
    skips: int
    dead: int
    staged_counts: tuple[tuple[int, ...], ...]

    def staged_everywhere(self, model: int, world_size: int) -> list[int]:
        """Layers of ``model`` every rank has staged, ascending."""
        counts = self.staged_counts[model]
        return [layer for layer, n in enumerate(counts) if n == world_size]


def encode_ready(report: ReadyReport, layers_per_model: Sequence[int]) -> list[int]:
    """The flat payload of ``report``; refuses a layer outside its model."""
    if len(report.staged) != len(layers_per_model):
        raise ValueError(
            f"report covers {len(report.staged)} models, the vote "
            f"{len(layers_per_model)}"
        )
    payload = [int(report.error), int(report.planned), int(report.skip)]
    payload.append(int(report.dead))
    for model, (staged, num_layers) in enumerate(
        zip(report.staged, layers_per_model, strict=True)
    ):
        flags = [0] * num_layers
        for layer in staged:
            if not 0 <= layer < num_layers:
                raise ValueError(
                    f"model {model}: staged layer {layer} is outside [0, {num_layers})"
                )
            flags[layer] = 1
        payload += flags
    return payload


def decode_ready(total: Sequence[int], layers_per_model: Sequence[int]) -> ReadyTally:
    """Read a summed payload (a list or a 1-D int tensor)."""
    # One conversion: iterating a tensor would index it once per entry.
    values = total.tolist() if hasattr(total, "tolist") else [int(v) for v in total]
    expected = _HEADER + sum(layers_per_model)
    if len(values) != expected:
        raise ValueError(
            f"ready vote has {len(values)} entries, expected {expected} "
            f"({_HEADER} flags + layers {list(layers_per_model)})"
        )
    counts, offset = [], _HEADER
    for num_layers in layers_per_model:
        counts.append(tuple(values[offset : offset + num_layers]))
        offset += num_layers
    return ReadyTally(*values[:_HEADER], staged_counts=tuple(counts))
