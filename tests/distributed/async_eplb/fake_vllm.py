"""Stand-ins for vLLM's config objects, for tests that run without vLLM.

They carry exactly the fields ``EplbState`` reads from vLLM's
``ParallelConfig``/``EPLBConfig`` and ``ModelConfig``; the vLLM integration
tests use the real classes.
"""

from __future__ import annotations

from types import SimpleNamespace

__all__ = ["model_config", "parallel_config"]


def parallel_config(**eplb: object) -> SimpleNamespace:
    """``ParallelConfig`` with an ``EPLBConfig``; ``eplb`` overrides its fields."""
    fields: dict[str, object] = dict(
        window_size=4,
        step_interval=4,
        num_redundant_experts=2,
        log_balancedness=False,
        log_balancedness_interval=1,
        use_async=True,
        policy="default",
    )
    fields.update(eplb)
    return SimpleNamespace(
        eplb_config=SimpleNamespace(**fields), enable_elastic_ep=False, num_ubatches=0
    )


def model_config(name: str = "toy") -> SimpleNamespace:
    """``ModelConfig``: a name and a ``compute_hash`` that counts its calls."""
    config = SimpleNamespace(model=name, hash_calls=0)

    def compute_hash() -> str:
        config.hash_calls += 1
        return f"{name}-hash"

    config.compute_hash = compute_hash
    return config
