"""Our own knobs, read from ``VLLM_ASYNC_EPLB_*`` environment variables.

vLLM's ``EPLBConfig`` keeps its meaning (window, interval, redundant experts,
logging, sync/async); these add what vLLM has no field for. Parsing is strict so
a typo fails at start-up with the variable and its value, not mid-serving.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .rebalance_algo import POLICIES as POLICY_REGISTRY

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENV_PREFIX",
    "TRANSPORT_NAMES",
    "AsyncEplbConfig",
    "plugin_enabled",
]

ENV_PREFIX = "VLLM_ASYNC_EPLB"
DEFAULT_TIMEOUT_S = 60.0
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# The policy names are the registry's (one list).
POLICIES = tuple(POLICY_REGISTRY)
# The transports (``transports/``) import this list from here.
TRANSPORT_NAMES = ("auto", "gloo-staged", "p2p", "ipc")


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def _parse_int(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _parse_float(name: str, raw: str, minimum: float, strict: bool) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={raw!r} must be finite")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name}={raw!r} must be {relation} {minimum}")
    return value


def plugin_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """``VLLM_ASYNC_EPLB=0`` turns the vLLM plugin off (default: on)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_PREFIX)
    return True if raw is None else _parse_bool(ENV_PREFIX, raw)


def _parse_text(name: str, raw: str) -> str:
    return raw.strip()


# Each knob: variable suffix, field, parser(name, raw). Ranges and names are
# checked once, in ``AsyncEplbConfig.__post_init__``.
_ENV_FIELDS: tuple[tuple[str, str, Callable[[str, str], object]], ...] = (
    ("POLICY", "policy", _parse_text),
    ("TRANSPORT", "transport", _parse_text),
    ("LAYERS_PER_STEP", "layers_per_step", lambda n, v: _parse_int(n, v, 1)),
    ("MIN_GAIN", "min_gain", lambda n, v: _parse_float(n, v, 0.0, strict=False)),
    ("VOTE_DELAY", "vote_delay", lambda n, v: _parse_int(n, v, 1)),
    ("TIMEOUT_S", "timeout_s", lambda n, v: _parse_float(n, v, 0.0, strict=True)),
    ("HEAL_REPLICAS", "heal_replicas", _parse_bool),
    ("CHECK_AFTER_REBALANCE", "check_after_rebalance", _parse_bool),
    ("RECORD", "record", _parse_text),
    ("INIT_PLACEMENT", "init_placement", _parse_text),
)


@dataclass(frozen=True)
class AsyncEplbConfig:
    """Knobs of the asynchronous path; defaults are the documented ones."""

    policy: str = "min_migration"
    """Placement policy given to ``rebalance_algo``."""
    transport: str = "auto"
    """Transport name for ``make_transport`` (``auto``, ``p2p``, ``ipc``, ...)."""
    layers_per_step: int = 1
    """Most layers committed in one engine step."""
    min_gain: float = 0.01
    """Skip a rebalance whose predicted balancedness gain is below this."""
    vote_delay: int = 2
    """Steps between launching a readiness vote and reading it (D)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """One limit, one meaning on every rank: a vote still incomplete this long
    after it is due fails (balancing turns off on every rank); a plan not
    ready, or staging without progress, this long after it started fails the
    round (the next vote aborts it everywhere); a transport gives up a wait
    after this long."""
    heal_replicas: bool = True
    """At start-up, copy replicas whose weights differ from their expert's
    primary slot from the slots that hold the expert (the warning is logged
    either way)."""
    check_after_rebalance: bool | None = None
    """Digest every committed slot and compare it with its expert's start-up
    digest; ``None``: on when the logger is at DEBUG level, else off."""
    record: str | None = None
    """Path of the load recording (``.npz``), written by EP rank 0; None: off."""
    init_placement: str | None = None
    """Placement or load file applied at ``add_model`` (warm start); None: off."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(
                f"{ENV_PREFIX}_POLICY={self.policy!r} is not one of {POLICIES}"
            )
        if self.transport not in TRANSPORT_NAMES:
            raise ValueError(
                f"{ENV_PREFIX}_TRANSPORT={self.transport!r} is not one of "
                f"{TRANSPORT_NAMES}"
            )
        if self.layers_per_step < 1:
            raise ValueError(
                f"{ENV_PREFIX}_LAYERS_PER_STEP={self.layers_per_step!r} must be >= 1"
            )
        if not 0.0 <= self.min_gain <= 1.0:
            raise ValueError(
                f"{ENV_PREFIX}_MIN_GAIN={self.min_gain!r} must be in [0, 1]"
            )
        if self.vote_delay < 1:
            raise ValueError(
                f"{ENV_PREFIX}_VOTE_DELAY={self.vote_delay!r} must be >= 1"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"{ENV_PREFIX}_TIMEOUT_S={self.timeout_s!r} must be > 0")
        for suffix, path in (
            ("RECORD", self.record),
            ("INIT_PLACEMENT", self.init_placement),
        ):
            if path is not None and not path.strip():
                raise ValueError(
                    f"{ENV_PREFIX}_{suffix}={path!r} is empty (unset it to turn it off)"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AsyncEplbConfig:
        """Read ``VLLM_ASYNC_EPLB_*``; unset variables take the defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for suffix, field_name, parse in _ENV_FIELDS:
            name = f"{ENV_PREFIX}_{suffix}"
            raw = env.get(name)
            if raw is not None:
                values[field_name] = parse(name, raw)
        return cls(**values)  # type: ignore[arg-type]
