"""Load generation of the simulated deployment: synthetic drift and trace replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm.distributed.async_eplb.simulation.load import (
    SHIPPED_TRACE,
    SyntheticLoad,
    TraceLoad,
    map_trace_geometry,
    read_trace,
    sample_routing,
    step_generator,
)


def test_sample_routing_draws_distinct_experts_per_token():
    probs = torch.softmax(torch.randn(3, 16, generator=step_generator(0, 0)), -1)
    ids = sample_routing(probs, 50, 4, step_generator(1, 2))
    assert ids.shape == (3, 50, 4)
    assert ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()


def test_sample_routing_is_a_function_of_seed_and_step():
    probs = torch.full((2, 8), 1 / 8, dtype=torch.float64)
    first = sample_routing(probs, 10, 2, step_generator(7, 3))
    again = sample_routing(probs, 10, 2, step_generator(7, 3))
    other = sample_routing(probs, 10, 2, step_generator(7, 4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sample_routing_follows_probabilities():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    ids = sample_routing(probs, 4000, 1, step_generator(0, 0))
    share = torch.bincount(ids.flatten(), minlength=4) / 4000
    assert abs(float(share[0]) - 0.7) < 0.03
    assert float(share[1:].min()) > 0.07


@pytest.mark.parametrize(
    ("shape", "tokens", "top_k", "message"),
    [((8,), 4, 2, "must be \\[L, E\\]"), ((2, 4), 4, 5, "top_k"), ((2, 4), 0, 2, "0")],
)
def test_sample_routing_rejects_bad_input(shape, tokens, top_k, message):
    with pytest.raises(ValueError, match=message):
        sample_routing(torch.ones(shape) / 4, tokens, top_k, step_generator(0, 0))


def test_synthetic_load_is_skewed_and_drifts_back():
    load = SyntheticLoad(4, 64, seed=3, skew=0.8, drift_period=100)
    start = load.probabilities(0)
    assert start.shape == (4, 64)
    torch.testing.assert_close(start.sum(-1), torch.ones(4, dtype=torch.float64))
    assert float((start.max(-1).values * 64).min()) > 2.0  # hottest > 2x the mean
    quarter = load.probabilities(25)
    assert float((quarter - start).abs().sum(-1).min()) > 0.3  # hot experts changed
    torch.testing.assert_close(load.probabilities(100), start)


def test_synthetic_load_is_a_function_of_seed():
    a = SyntheticLoad(2, 8, seed=1).probabilities(5)
    assert torch.equal(a, SyntheticLoad(2, 8, seed=1).probabilities(5))
    assert not torch.equal(a, SyntheticLoad(2, 8, seed=2).probabilities(5))


@pytest.mark.parametrize(("skew", "period"), [(-1.0, 10), (float("nan"), 10), (1, 0)])
def test_synthetic_load_rejects_bad_parameters(skew, period):
    with pytest.raises(ValueError, match=r"skew|drift_period"):
        SyntheticLoad(2, 8, seed=0, skew=skew, drift_period=period)


def test_read_trace_concatenates_npz_arrays_in_file_order(tmp_path):
    first = np.ones((2, 3, 4), dtype=np.int32)
    second = 2 * np.ones((5, 3, 4), dtype=np.int32)
    path = tmp_path / "t.npz"
    np.savez(path, b_first=first, a_second=second)
    trace = read_trace(path)
    assert trace.shape == (7, 3, 4)
    assert (trace[:2] == 1).all() and (trace[2:] == 2).all()


def test_read_trace_reads_a_2d_npy_as_one_layer(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(1, 13).reshape(3, 4))
    assert read_trace(path).shape == (3, 1, 4)


def test_read_trace_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"not found: .*missing\.npz"):
        read_trace(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npy"
    np.save(bad, -np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"bad\.npy has negative"):
        read_trace(bad)
    text = tmp_path / "t.csv"
    text.write_text("1,2\n")
    with pytest.raises(ValueError, match=r"t\.csv must be a \.npz, \.npy"):
        read_trace(text)
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, a=np.ones((2, 3, 4)), b=np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="one geometry"):
        read_trace(mixed)


def _random_trace(windows: int, layers: int, experts: int) -> np.ndarray:
    return np.random.default_rng(0).integers(1, 50, (windows, layers, experts)) * 1.0


def test_map_trace_geometry_is_identity_when_it_fits():
    trace = _random_trace(4, 3, 8)
    np.testing.assert_array_equal(map_trace_geometry(trace, 3, 8, seed=0), trace)


@pytest.mark.parametrize("experts", [3, 8, 20, 32])
def test_map_trace_geometry_keeps_each_window_total(experts):
    trace = _random_trace(4, 3, 8)
    mapped = map_trace_geometry(trace, 5, experts, seed=1)
    assert mapped.shape == (4, 5, experts)
    np.testing.assert_allclose(mapped.sum(-1), trace[:, [0, 1, 2, 0, 1]].sum(-1))
    assert not np.allclose(mapped[:, 3], mapped[:, 0])  # wrapped layers differ


def test_trace_load_stretches_the_trace_over_the_run(tmp_path):
    trace = np.zeros((4, 1, 4))
    for window in range(4):
        trace[window, 0, window] = 10.0  # window w loads expert w
    path = tmp_path / "t.npy"
    np.save(path, trace)
    load = TraceLoad(path, 1, 4, num_steps=8, seed=0)
    hottest = [int(load.probabilities(s).argmax()) for s in range(8)]
    assert hottest == [0, 0, 1, 1, 2, 2, 3, 3]
    assert float(load.probabilities(0).min()) > 0  # every expert stays drawable
    assert "t.npy (4 windows x 1 layers x 4 experts)" in load.description


def test_shipped_trace_is_the_deepseek_v2_lite_geometry():
    trace = read_trace(SHIPPED_TRACE)
    assert trace.shape[1:] == (26, 64)
    np.testing.assert_array_equal(trace.sum(-1), 768)
