"""Test scaffolding: inject a fault where a staging worker stages a layer.

:func:`install_fault_hook` makes every ``gloo-staged`` transport of this
process (the CPU transport) call ``hook()`` before staging a layer, on the
staging thread, inside the worker's error handling: the hook may raise (the
layer fails), sleep (staging is slow) or raise a ``BaseException`` that is not
an ``Exception`` (the staging thread dies). Not part of the runtime package.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm.distributed.async_eplb.transports.gloo_staged import GlooStagedTransport

__all__ = ["install_fault_hook"]

_ORIGINAL = GlooStagedTransport.stage_layer


def install_fault_hook(hook: Callable[[], None] | None) -> None:
    """Install ``hook`` (``None`` removes it)."""
    if hook is None:
        GlooStagedTransport.stage_layer = _ORIGINAL  # type: ignore[method-assign]
        return

    def stage_layer(self, *args, **kwargs) -> int:
        hook()
        return _ORIGINAL(self, *args, **kwargs)

    GlooStagedTransport.stage_layer = stage_layer  # type: ignore[method-assign]
