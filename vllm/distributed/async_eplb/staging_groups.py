"""The staging process groups of one ``EplbState``: current, spares, retired.

A failed transfer can leave a gloo group unusable (pairs closed on timeout),
and NCCL/HCCL ignore message tags, so after an abort staging moves to a fresh
group. Creating a group is a collective of the whole world, which an abort in
one EP group cannot run: the spares are created up front, at ``add_model``.
A group given up is retired (destroyed at shutdown, when no thread can still
be waiting on it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["SPARE_STAGING_GROUPS", "StagingGroups"]

SPARE_STAGING_GROUPS = 2


class StagingGroups:
    """Which staging group is in use, which are in reserve, which retired.

    ``None`` stands for a single-rank group (nothing to communicate with).
    """

    def __init__(self, current: Any, spares: list[Any]) -> None:
        self.current = current
        self._spares = list(spares)
        self._retired: list[Any] = []

    @classmethod
    def create(
        cls, new_group: Callable[[], Any], spares: int = SPARE_STAGING_GROUPS
    ) -> StagingGroups:
        """Call ``new_group`` (a collective) ``1 + spares`` times, in order."""
        if spares < 0:
            raise ValueError(f"spares must be >= 0, got {spares}")
        current = new_group()
        return cls(current, [new_group() for _ in range(spares)])

    @property
    def spares_left(self) -> int:
        return len(self._spares)

    def replace(self) -> bool:
        """Retire the current group for the next spare; False if none is left
        (nothing changes then)."""
        if not self._spares:
            return False
        self._retired.append(self.current)
        self.current = self._spares.pop(0)
        return True

    def release(self, *, keep_in_use: bool) -> list[Any]:
        """Forget every group; return those safe to destroy (no ``None``).

        ``keep_in_use``: a thread may still wait on the current or a retired
        group, which must then outlive it (left to the process exit).
        """
        groups = list(self._spares)
        if not keep_in_use:
            groups += [self.current, *self._retired]
        self.current, self._spares, self._retired = None, [], []
        return [g for g in groups if g is not None]
