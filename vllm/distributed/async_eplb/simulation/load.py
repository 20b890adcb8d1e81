"""Routing load for the simulated deployment: synthetic drift, or a replayed trace.

A load source gives, for every step, the probability that a token's top-k
picks each logical expert of each layer (``[L, E]``). ``sample_routing`` turns
that into the top-k expert ids of a batch. Everything is a pure function of
(seed, step), so every rank draws the same global batch with no communication.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vllm.distributed.async_eplb.placement_files import (
    PlacementFileError,
    read_load_trace,
)

__all__ = [
    "SHIPPED_TRACE",
    "LoadSource",
    "SyntheticLoad",
    "TraceLoad",
    "map_trace_geometry",
    "read_trace",
    "sample_routing",
    "step_generator",
]

SHIPPED_TRACE = Path(__file__).resolve().parent.parent / "data" / "loads_w128.npz"
"""Real DeepSeek-V2-Lite routing (26 layers x 64 experts, ESFT logs), shipped."""


class LoadSource(Protocol):
    """Per-step routing probabilities ``[num_layers, num_experts]``, rows sum to 1."""

    num_layers: int
    num_experts: int
    description: str

    def probabilities(self, step: int) -> torch.Tensor: ...


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step): identical on every rank."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_routing(
    probabilities: torch.Tensor, num_tokens: int, top_k: int, generator: torch.Generator
) -> torch.Tensor:
    """Top-k logical expert ids ``[L, num_tokens, top_k]`` drawn without replacement.

    Gumbel top-k: adding Gumbel noise to log-probabilities and keeping the k
    largest samples k distinct experts with the right probabilities, for all
    layers and tokens in one vectorised call.
    """
    if probabilities.dim() != 2:
        raise ValueError(
            f"probabilities must be [L, E], got shape {tuple(probabilities.shape)}"
        )
    num_layers, num_experts = probabilities.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    uniform = torch.rand(
        (num_layers, num_tokens, num_experts), generator=generator, dtype=torch.float64
    )
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    scores = probabilities.to(torch.float64).log().unsqueeze(1) + gumbel
    return scores.topk(top_k, dim=-1).indices


class SyntheticLoad:
    """Skewed routing that drifts: each layer turns slowly between two patterns.

    Logits are ``skew * (cos(a) * A + sin(a) * B)`` with A, B standard normal
    per (layer, expert) and ``a`` advancing ``2 * pi / drift_period`` per step.
    The skew (log-normal popularity) stays the same at every step while the
    identity of the hot experts keeps changing, so a placement goes stale.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        seed: int,
        skew: float = 0.8,
        drift_period: int = 400,
    ) -> None:
        if skew < 0 or not math.isfinite(skew):
            raise ValueError(f"skew must be finite and >= 0, got {skew}")
        if drift_period <= 0:
            raise ValueError(f"drift_period must be > 0, got {drift_period}")
        generator = torch.Generator().manual_seed(seed)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self._patterns = torch.randn(
            (2, num_layers, num_experts), generator=generator, dtype=torch.float64
        )
        self._skew = skew
        self._drift_period = drift_period
        self.description = (
            f"synthetic (log-normal skew {skew}, one full drift every "
            f"{drift_period} steps)"
        )

    def probabilities(self, step: int) -> torch.Tensor:
        angle = 2.0 * math.pi * step / self._drift_period
        logits = self._skew * (
            math.cos(angle) * self._patterns[0] + math.sin(angle) * self._patterns[1]
        )
        return torch.softmax(logits, dim=-1)


def read_trace(path: str | Path) -> np.ndarray:
    """A load trace ``[windows, layers, experts]`` from any file with load.

    ``.npz`` / ``.npy`` traces (an ``.npz`` of several arrays, e.g. one per
    task, is concatenated over windows in file order; ``[windows, experts]``
    is one layer), our recordings (``VLLM_ASYNC_EPLB_RECORD``, ``--record``)
    and SGLang's ``logical_count`` files (``.pt`` / ``.json``): see
    ``placement_files``. Raises ValueError naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file not found: {path}")
    try:
        return read_load_trace(path)
    except PlacementFileError as exc:
        raise ValueError(f"trace {exc}") from None


def map_trace_geometry(
    trace: np.ndarray, num_layers: int, num_experts: int, *, seed: int
) -> np.ndarray:
    """Reshape a trace ``[W, L0, E0]`` to ``[W, num_layers, num_experts]``.

    Layer l replays trace layer ``l % L0``. Experts map through a fixed
    row-stochastic matrix, so each window's total load is kept: the identity
    when the geometry fits; with more experts, each trace expert splits
    unevenly among the children it was dealt; with fewer, trace experts are
    summed into their assigned expert. Layers past ``L0`` and non-identity
    mappings are shuffled per layer so that no two layers are copies.
    """
    _, trace_layers, trace_experts = trace.shape
    rng = np.random.default_rng(seed)
    mapped = np.empty((trace.shape[0], num_layers, num_experts))
    for layer in range(num_layers):
        source = trace[:, layer % trace_layers, :]
        if num_experts == trace_experts and layer < trace_layers:
            mapped[:, layer, :] = source
            continue
        matrix = np.zeros((trace_experts, num_experts))
        if num_experts >= trace_experts:
            parent = rng.permutation(num_experts) % trace_experts
            share = rng.uniform(0.5, 1.5, size=num_experts)
            siblings_total = np.bincount(parent, weights=share, minlength=trace_experts)
            matrix[parent, np.arange(num_experts)] = share / siblings_total[parent]
        else:
            child = rng.permutation(trace_experts) % num_experts
            matrix[np.arange(trace_experts), child] = 1.0
        mapped[:, layer, :] = source @ matrix
    return mapped


class TraceLoad:
    """Replays an expert-load trace, stretched so the whole trace spans the run.

    Step s uses window ``s * W // num_steps``: every workload shift in the
    trace happens during the run, whatever its length.
    """

    def __init__(
        self,
        path: str | Path,
        num_layers: int,
        num_experts: int,
        *,
        num_steps: int,
        seed: int,
    ) -> None:
        if num_steps <= 0:
            raise ValueError(f"num_steps must be > 0, got {num_steps}")
        raw = read_trace(path)
        mapped = map_trace_geometry(raw, num_layers, num_experts, seed=seed)
        # A floor keeps every expert drawable, so top-k always has k candidates.
        mapped += 1e-6 * mapped.sum(axis=-1, keepdims=True) / num_experts
        self._probabilities = torch.from_numpy(mapped / mapped.sum(-1, keepdims=True))
        self._num_steps = num_steps
        self.num_layers = num_layers
        self.num_experts = num_experts
        windows, layers, experts = raw.shape
        if experts != num_experts or num_layers > layers:
            geometry = f", mapped to {num_layers} x {num_experts}"
        elif num_layers < layers:
            geometry = f", first {num_layers} layers"
        else:
            geometry = ""
        self.description = (
            f"trace {Path(path).name} ({windows} windows x {layers} layers x "
            f"{experts} experts{geometry})"
        )

    def probabilities(self, step: int) -> torch.Tensor:
        windows = self._probabilities.shape[0]
        index = min(step * windows // self._num_steps, windows - 1)
        return self._probabilities[index]
