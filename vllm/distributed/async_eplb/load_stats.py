"""Expert-load statistics: the window, attribution, balancedness, predicted gain.

Pure (no process group). Load is attributed to logical experts at the step it is
recorded, with the placement in force during that forward pass: layers commit
at different steps, so attributing a whole physical window with today's map (as
vLLM does) would credit tokens to the wrong experts after a partial rebalance.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import torch

from vllm.distributed.async_eplb.rebalance_algo.quality import rank_loads

__all__ = [
    "LoadWindow",
    "balancedness",
    "fold_to_logical",
    "predicted_balancedness",
    "predicted_rank_load",
    "tokens_per_rank",
]


def _check_load(name: str, load: torch.Tensor) -> None:
    if load.dtype.is_floating_point and bool(torch.isnan(load).any()):
        raise ValueError(f"{name} contains NaN")
    if load.numel() and bool((load < 0).any()):
        raise ValueError(f"{name} contains a negative load (min {load.min().item()})")


def fold_to_logical(
    physical_load: torch.Tensor,
    phy2log: torch.Tensor,
    num_logical_experts: int,
    check_values: bool = True,
) -> torch.Tensor:
    """Sum per-slot load ``[L, P]`` into per-expert load ``[L, E]`` (int64).

    ``phy2log`` must be the placement the load was recorded under.
    ``check_values=False`` skips the NaN/negative check, which would make the
    host wait for the device every step.
    """
    if physical_load.shape != phy2log.shape or physical_load.dim() != 2:
        raise ValueError(
            f"physical load of shape {tuple(physical_load.shape)} does not match "
            f"phy2log of shape {tuple(phy2log.shape)}"
        )
    if check_values:
        _check_load("physical load", physical_load)
    out = torch.zeros(
        phy2log.shape[0], num_logical_experts, dtype=torch.int64, device=phy2log.device
    )
    out.scatter_add_(1, phy2log.to(torch.int64), physical_load.to(out))
    return out


def tokens_per_rank(physical_load: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Per-layer tokens each rank processes: ``[L, P] -> [L, R]``."""
    num_layers, num_physical = physical_load.shape
    if num_ranks <= 0 or num_physical % num_ranks:
        raise ValueError(f"{num_physical} slots are not divisible by {num_ranks} ranks")
    return physical_load.reshape(num_layers, num_ranks, -1).sum(dim=-1)


def balancedness(rank_tokens: torch.Tensor) -> tuple[float, float, float]:
    """``(avg_tokens, max_tokens, balancedness)`` of ``[L, R]``, vLLM's way.

    Means and maxes are summed over layers, then divided; 0.0 without load.
    """
    _check_load("rank load", rank_tokens)
    rank_tokens = rank_tokens.to(torch.float64)
    avg = float(rank_tokens.mean(dim=1).sum())
    peak = float(rank_tokens.max(dim=1).values.sum())
    return avg, peak, (avg / peak if peak > 0 else 0.0)


def predicted_rank_load(
    logical_load: torch.Tensor, phy2log: torch.Tensor, num_ranks: int
) -> torch.Tensor:
    """Expected ``[L, R]`` load (float64, CPU) if ``logical_load`` is served by
    ``phy2log``: the policies' own score (``rebalance_algo.quality.rank_loads``,
    an expert's tokens split evenly over its replicas), so the predicted gain
    and the policies' balance are one computation.
    """
    _check_load("logical load", logical_load)
    loads = rank_loads(
        logical_load.detach().to("cpu").numpy(),
        phy2log.detach().to("cpu").numpy(),
        num_ranks,
    )
    return torch.from_numpy(loads)


def predicted_balancedness(
    logical_load: torch.Tensor, phy2log: torch.Tensor, num_ranks: int
) -> float:
    """Balancedness ``phy2log`` would reach under ``logical_load``."""
    return balancedness(predicted_rank_load(logical_load, phy2log, num_ranks))[2]


class LoadWindow:
    """Ring of the last ``window_size`` recorded steps of per-slot load.

    Each step is stored as recorded (one copy per step, as cheap as vLLM's
    window) together with the version of the placement it ran under;
    :meth:`placement_changed` starts a new version after a commit.
    :meth:`total` folds each step with its own version's ``phy2log``.
    """

    def __init__(
        self, window_size: int, phy2log: torch.Tensor, num_logical_experts: int
    ) -> None:
        if window_size <= 0:
            raise ValueError(f"window_size must be > 0, got {window_size}")
        if phy2log.dim() != 2:
            raise ValueError(
                f"phy2log must have shape [L, P], got {tuple(phy2log.shape)}"
            )
        self.num_logical_experts = num_logical_experts
        self._steps = torch.zeros(
            (window_size, *phy2log.shape), dtype=torch.int64, device=phy2log.device
        )
        # One view per slot, made once: a record is then one copy.
        self._slots = self._steps.unbind(0)
        self._step_shape = phy2log.shape
        self._version_of_step = [-1] * window_size  # -1: slot never written
        # layer * E per layer, so a placement is kept as its flat index into
        # the [L, E] result (layer * E + logical expert)
        self._layer_offsets = (
            torch.arange(phy2log.shape[0], device=phy2log.device).view(-1, 1)
            * num_logical_experts
        )
        self._placements = {0: self._flat_index(phy2log)}
        self._version = 0
        self._next = 0
        self.num_recorded = 0
        self._changed_to: torch.Tensor | None = None  # see placement_changed
        # (num_recorded when made, partial sum): see prefold
        self._prefolded: tuple[int, torch.Tensor] | None = None
        self._launch_fold_kernels()

    def _launch_fold_kernels(self) -> None:
        """Run every fold once now, at start-up, and drop the result.

        The first launch of a kernel loads it (CUDA lazy loading): the fold's
        kernels cost 40-55 ms of host time on an H200 host the first time,
        which landed on the first rebalance's step.
        """
        scratch = torch.zeros(
            self._steps.shape[1],
            self.num_logical_experts,
            dtype=torch.int64,
            device=self._steps.device,
        )
        flat = self._placements[0]
        self._fold_one(scratch, flat, self._steps)
        size = self.window_size
        if size > 1:  # one slot never holds two versions
            # CUDA's cat has two paths: a batched kernel when every input is
            # contiguous (every run one slot long) and a copy per input when
            # one is not (a longer run's expanded index); launch both, and the
            # prefold's cat of the ring's two ends
            self._fold_many(scratch, [(flat, 1)] * size, self._steps)
            self._fold_many(scratch, [(flat, 1), (flat, size - 1)], self._steps)
            self._slot_values(size - 1, 2)

    @property
    def window_size(self) -> int:
        return self._steps.shape[0]

    @property
    def total_numel(self) -> int:
        """Entries of :meth:`total`'s ``[L, E]`` result."""
        return self._steps.shape[1] * self.num_logical_experts

    def record(self, physical_load: torch.Tensor) -> None:
        """Store one step's ``[L, P]`` load under the current placement.

        Runs on the engine's thread every step: one device op (two in the
        step after a commit: the new placement's snapshot)."""
        if physical_load.shape != self._step_shape:
            raise ValueError(
                f"load of shape {tuple(physical_load.shape)} does not match the "
                f"window's {tuple(self._step_shape)}"
            )
        if self._changed_to is not None:
            self._start_version(self._changed_to)
            self._changed_to = None
        self._slots[self._next].copy_(physical_load)
        self._version_of_step[self._next] = self._version
        self._next = (self._next + 1) % self.window_size
        self.num_recorded += 1

    def placement_changed(self, phy2log: torch.Tensor) -> None:
        """Steps recorded from now on ran under ``phy2log`` (after a commit).

        Runs on a commit step, so it only notes the map: the next
        :meth:`record` snapshots it (no device op here). The map must not
        change before then other than by a commit followed by this call (a
        step records before it commits): steps ran under its state then.
        """
        if phy2log.shape != self._step_shape:
            raise ValueError(
                f"phy2log of shape {tuple(phy2log.shape)} does not match the "
                f"window's {tuple(self._step_shape)}"
            )
        self._changed_to = phy2log

    def _start_version(self, phy2log: torch.Tensor) -> None:
        """Steps recorded from now on ran under ``phy2log`` (a snapshot)."""
        in_use = set(self._version_of_step)
        self._placements = {v: m for v, m in self._placements.items() if v in in_use}
        self._version += 1
        self._placements[self._version] = self._flat_index(phy2log)

    def _flat_index(self, phy2log: torch.Tensor) -> torch.Tensor:
        """``phy2log`` as an index into the flat ``[L * E]`` result (int64, a
        new tensor: the caller's map may change in place later)."""
        return phy2log.detach() + self._layer_offsets

    def total(self) -> torch.Tensor:
        """Logical load summed over the window, ``[L, E]`` int64.

        Three device ops at most whatever the number of placement versions in
        the window (zeros, cat, scatter_add; one placement: zeros, sum,
        scatter_add): it runs on the engine's thread at each rebalance, where
        each small op costs ~0.05-0.1 ms on an H200 host. One op after
        :meth:`prefold` in the step before (only the newest step is folded).
        """
        prefolded, self._prefolded = self._prefolded, None
        if prefolded is not None and prefolded[0] + 1 == self.num_recorded:
            out = prefolded[1]
            newest = (self._next - 1) % self.window_size
            flat = self._placements[self._version_of_step[newest]]
            out.view(-1).scatter_add_(0, flat.view(-1), self._slots[newest].view(-1))
            return out
        return self._fold(0, self.window_size)

    def prefold(self) -> None:
        """Fold every step but the one the next :meth:`record` replaces.

        Called in the step before a rebalance's, so that step's :meth:`total`
        folds only its own newest step: the window sum is the heaviest work
        of a rebalance's first step (0.2-0.3 ms of its 0.8 ms on the H200s).
        Used by the next :meth:`total` only if exactly one step was recorded
        in between; steps are never re-versioned, so nothing else can stale it.
        """
        size = self.window_size
        self._prefolded = (
            self.num_recorded,
            self._fold((self._next + 1) % size, size - 1),
        )

    def _fold(self, start: int, count: int) -> torch.Tensor:
        """The logical load of ``count`` slots from ``start`` on (ring order,
        written or not), ``[L, E]``."""
        out = torch.zeros(
            self._steps.shape[1],
            self.num_logical_experts,
            dtype=torch.int64,
            device=self._steps.device,
        )
        runs = self._runs([(start + i) % self.window_size for i in range(count)])
        if len(runs) == 1:
            self._fold_one(out, runs[0][0], self._slot_values(start, count))
        elif runs:
            self._fold_many(out, runs, self._slot_values(start, count))
        return out

    def _slot_values(self, start: int, count: int) -> torch.Tensor:
        """``count`` slots from ``start`` on, ``[count, L, P]``: a view of the
        ring unless they wrap around its end (then one cat)."""
        end = start + count
        if end <= self.window_size:
            return self._steps[start:end]
        return torch.cat([self._steps[start:], self._steps[: end - self.window_size]])

    def _runs(self, slots: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """``(flat index, length)`` of each run of consecutive ``slots`` (in
        the order given) recorded under one version; none if none is written.

        Never-written slots hold zeros: they join a neighbouring run (any
        placement folds them to zero).
        """
        runs: list[list[int]] = []  # [version, length]
        unwritten = 0  # before the first written slot (prefold's ring order)
        for version, group in groupby(self._version_of_step[i] for i in slots):
            length = len(list(group))
            if version != -1:
                runs.append([version, length])
            elif runs:
                runs[-1][1] += length
            else:
                unwritten = length
        if runs:
            runs[0][1] += unwritten
        return [(self._placements[v], n) for v, n in runs]

    def _fold_one(
        self, out: torch.Tensor, flat: torch.Tensor, values: torch.Tensor
    ) -> None:
        """One placement over ``values`` (the usual case once a rebalance's
        commits have left the window): sum the steps, then fold once; 2 ops."""
        out.view(-1).scatter_add_(0, flat.view(-1), values.sum(dim=0).view(-1))

    def _fold_many(
        self,
        out: torch.Tensor,
        runs: list[tuple[torch.Tensor, int]],
        values: torch.Tensor,
    ) -> None:
        """Several placements: each run's flat index expanded over its slots
        (views), one cat into a per-slot index, one flat scatter of every step
        and slot; 2 device ops, no host tensor and no copy to the device."""
        index = torch.cat([flat.expand(n, *flat.shape) for flat, n in runs])
        out.view(-1).scatter_add_(0, index.view(-1), values.reshape(-1))
