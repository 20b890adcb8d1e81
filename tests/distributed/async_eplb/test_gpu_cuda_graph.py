"""CUDA graphs stay valid across an in-place commit (issue 7, item 5).

The measurement lives in ``benchmarks/eplb/gpu/bench_gpu.py`` (so the benchmark
and this test check the same thing); this test asserts its verdicts.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BENCH = Path(__file__).resolve().parents[3] / "benchmarks/eplb/gpu/bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_graph_replay_after_in_place_commit_equals_eager():
    bench = load_bench()
    from vllm.distributed.async_eplb.device import DeviceBackend

    torch.cuda.set_device(0)
    verdict = bench.measure_cuda_graph(DeviceBackend.for_device("cuda:0"))
    assert verdict == {
        "replay_equals_eager_after_commit": True,
        "replay_matches_reference_after_commit": True,
        "matched_before_commit": True,
        "weights_moved": True,
        "addresses_unchanged": True,
    }
