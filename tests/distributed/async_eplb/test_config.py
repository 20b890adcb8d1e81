"""VLLM_ASYNC_EPLB_* parsing: defaults, valid values, clear errors."""

from __future__ import annotations

import pytest

from vllm.distributed.async_eplb.config import AsyncEplbConfig, plugin_enabled


def test_defaults_when_unset() -> None:
    config = AsyncEplbConfig.from_env({})
    assert config == AsyncEplbConfig()
    assert (config.policy, config.transport, config.layers_per_step) == (
        "min_migration",
        "auto",
        1,
    )
    assert plugin_enabled({}) is True


def test_values_are_parsed() -> None:
    config = AsyncEplbConfig.from_env(
        {
            "VLLM_ASYNC_EPLB_POLICY": "default",
            "VLLM_ASYNC_EPLB_TRANSPORT": "p2p",
            "VLLM_ASYNC_EPLB_LAYERS_PER_STEP": " 3 ",
            "VLLM_ASYNC_EPLB_MIN_GAIN": "0.05",
            "VLLM_ASYNC_EPLB_VOTE_DELAY": "4",
            "VLLM_ASYNC_EPLB_TIMEOUT_S": "2.5",
        }
    )
    assert config == AsyncEplbConfig("default", "p2p", 3, 0.05, 4, 2.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VLLM_ASYNC_EPLB_POLICY", "fastest"),
        ("VLLM_ASYNC_EPLB_LAYERS_PER_STEP", "0"),
        ("VLLM_ASYNC_EPLB_LAYERS_PER_STEP", "two"),
        ("VLLM_ASYNC_EPLB_MIN_GAIN", "-0.1"),
        ("VLLM_ASYNC_EPLB_MIN_GAIN", "1.5"),
        ("VLLM_ASYNC_EPLB_MIN_GAIN", "nan"),
        ("VLLM_ASYNC_EPLB_VOTE_DELAY", "0"),
        ("VLLM_ASYNC_EPLB_TIMEOUT_S", "0"),
        ("VLLM_ASYNC_EPLB_TIMEOUT_S", "soon"),
        ("VLLM_ASYNC_EPLB_TRANSPORT", ""),
    ],
)
def test_bad_value_names_variable_and_value(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        AsyncEplbConfig.from_env({name: value})
    assert repr(value.strip()) in str(info.value) or value.strip() in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"), [("0", False), ("off", False), ("1", True), ("TRUE", True)]
)
def test_plugin_switch(raw: str, expected: bool) -> None:
    assert plugin_enabled({"VLLM_ASYNC_EPLB": raw}) is expected


def test_plugin_switch_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="VLLM_ASYNC_EPLB='maybe'"):
        plugin_enabled({"VLLM_ASYNC_EPLB": "maybe"})


def test_record_and_init_placement_paths() -> None:
    config = AsyncEplbConfig.from_env(
        {
            "VLLM_ASYNC_EPLB_RECORD": " /data/load.npz ",
            "VLLM_ASYNC_EPLB_INIT_PLACEMENT": "/data/p.json",
        }
    )
    assert config.record == "/data/load.npz"
    assert config.init_placement == "/data/p.json"
    assert AsyncEplbConfig.from_env({}).record is None
    for name in ("VLLM_ASYNC_EPLB_RECORD", "VLLM_ASYNC_EPLB_INIT_PLACEMENT"):
        with pytest.raises(ValueError, match=f"{name}='' is empty"):
            AsyncEplbConfig.from_env({name: "  "})
