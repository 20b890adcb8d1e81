"""Why a small simulation's balancedness after rebalancing can fall below the
placement that never moved: the placement is fitted to a window of sampled
routing, and a short window of few tokens is mostly sampling noise.

Replays the simulator's own load, routing (``runner._routing``) and placement
policy in one process, with no ``EplbState`` and every placement applied at
once (no layer-by-layer lag), and scores each placement on the steps after it,
which it was not fitted to: the simulator's "after" and "never moved" rows.

    python benchmarks/eplb/bench_sim_window.py
"""

from __future__ import annotations

import statistics

import torch

from vllm.distributed.async_eplb.maps import compute_logical_maps
from vllm.distributed.async_eplb.model_state import initial_row
from vllm.distributed.async_eplb.rebalance_algo import rebalance_experts
from vllm.distributed.async_eplb.simulation.runner import (
    SimConfig,
    _routing,
    routed_balancedness,
)

# preset, layers, ranks, redundant, steps, interval, window, tokens
CONFIGS = [
    ("qwen3-30b-a3b", 2, 2, 4, 32, 8, 8, 32),  # test_simulate's small run
    ("qwen3-30b-a3b", 2, 2, 4, 256, 32, 32, 32),
    ("qwen3-30b-a3b", 2, 2, 4, 256, 32, 32, 128),
    ("qwen3-30b-a3b", 2, 4, 4, 256, 32, 32, 128),
    ("qwen3-30b-a3b", 2, 8, 8, 256, 32, 32, 128),
    ("deepseek-v2-lite", 4, 4, 16, 260, 32, 32, 128),  # the old default (now 192 steps)
]


def after_and_never(
    preset: str,
    layers: int,
    ranks: int,
    redundant: int,
    steps: int,
    interval: int,
    window: int,
    tokens: int,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean balancedness from the first rebalance on: (rebalanced, never moved)."""
    config = SimConfig(
        preset=preset,
        layers=layers,
        ranks=ranks,
        redundant=redundant,
        steps=steps,
        step_interval=interval,
        window=window,
        tokens=tokens,
        seed=seed,
    )
    model = config.model
    experts, slots = model.num_routed_experts, model.num_routed_experts + redundant
    load = config.make_load()
    placement = torch.tensor(initial_row(experts, redundant)).expand(layers, -1)
    unmoved = compute_logical_maps(placement, experts)
    maps, counts, after, never = None, [], [], []
    rebalance_at = set(range(max(1, interval // 4), steps, interval))
    for step in range(steps):
        if step in rebalance_at:
            seen = torch.stack(counts[max(0, step - window) : step]).sum(0).float()
            placement = rebalance_experts(
                seen,
                slots,
                model.num_expert_groups,
                1,
                ranks,
                placement,
                policy=config.policy,
            ).reshape(layers, slots)
            maps = compute_logical_maps(placement, experts)
        ids = _routing(config, load, step)
        flat = ids.reshape(layers, -1)
        count = torch.zeros(layers, experts, dtype=torch.int64)
        counts.append(count.scatter_add_(1, flat, torch.ones_like(flat)))
        if maps is not None:
            after.append(routed_balancedness(ids, *maps, ranks))
            never.append(routed_balancedness(ids, *unmoved, ranks))
    return statistics.mean(after), statistics.mean(never)


def main() -> None:
    print("preset layers ranks redundant steps interval window tokens: after never")
    for config in CONFIGS:
        after, never = after_and_never(*config)
        print(*config, f": {after:.3f} {never:.3f}", flush=True)
    for config in (CONFIGS[0], CONFIGS[2]):
        pairs = [after_and_never(*config, seed=seed) for seed in range(8)]
        gaps = [after - never for after, never in pairs]
        print(
            *config,
            ": after - never over seeds 0-7:",
            " ".join(f"{g:+.3f}" for g in gaps),
            f"mean {statistics.mean(gaps):+.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
