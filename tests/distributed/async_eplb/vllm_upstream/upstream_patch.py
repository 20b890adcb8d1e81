"""A pytest plugin that puts async_eplb's functions where vLLM's own EPLB tests
look for vLLM's, so those tests check our code.

The replacements happen in ``pytest_configure``, before any test module is
imported: vLLM's tests import ``compute_logical_maps`` by name.

- ``DefaultEplbPolicy.rebalance_experts`` -> ``rebalance_algo.rebalance_experts``
  with ``policy="default"``;
- ``DefaultEplbPolicy.preserve_intragpu_slots`` -> ``preserve_rank_slots``;
- ``eplb_state.compute_logical_maps`` -> ``maps.compute_logical_maps``.

vLLM functions with no counterpart here (``_compute_eplb_load_stats``) stay
vLLM's; a test that calls only those checks vLLM, not us.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm.distributed.async_eplb import maps, rebalance_algo
from vllm.distributed.async_eplb.rebalance_algo.default import preserve_rank_slots

REPLACED = (
    "DefaultEplbPolicy.rebalance_experts",
    "DefaultEplbPolicy.preserve_intragpu_slots",
    "eplb_state.compute_logical_maps",
)


def _rebalance_experts(
    cls: type,
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    return rebalance_algo.rebalance_experts(
        weight,
        num_replicas,
        num_groups,
        num_nodes,
        num_ranks,
        old_global_expert_indices,
        policy="default",
    )


def _preserve_intragpu_slots(
    cls: type, phy2log: np.ndarray, num_ranks: int, old_phy2log: np.ndarray
) -> np.ndarray:
    return preserve_rank_slots(phy2log, old_phy2log, num_ranks)


class AsyncEplbInPlaceOfVllm:
    """Pass an instance to ``pytest.main(plugins=[...])``."""

    def pytest_configure(self, config: pytest.Config) -> None:
        from vllm.distributed.eplb import eplb_state
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

        DefaultEplbPolicy.rebalance_experts = classmethod(_rebalance_experts)
        DefaultEplbPolicy.preserve_intragpu_slots = classmethod(
            _preserve_intragpu_slots
        )
        eplb_state.compute_logical_maps = maps.compute_logical_maps

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        return ["replaced by async_eplb's: " + ", ".join(REPLACED)]
