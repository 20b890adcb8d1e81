"""The vLLM plugin, loaded through vLLM's real ``load_general_plugins()``.

Each case runs in a fresh interpreter: the plugin rebinds names inside vLLM's
modules, which must not leak into other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm.plugins")
pytestmark = pytest.mark.vllm

_CHECK = textwrap.dedent(
    """
    import importlib, sys
    from types import SimpleNamespace
    {pre_import}
    import vllm.plugins
    vllm.plugins.load_general_plugins()
    from vllm.distributed.async_eplb.eplb_state import EplbState as Ours
    from vllm.distributed.async_eplb.plugin import VLLM_MODULES
    held = {{}}
    for name in VLLM_MODULES if {expect_ours} else VLLM_MODULES[:1]:
        module = importlib.import_module(name)
        cls = module.EplbState
        held[name] = isinstance(cls, type) and issubclass(cls, Ours)
    print("HELD", held)
    assert all(held.values()) == {expect_ours}, held
    assert any(held.values()) == {expect_ours}, held
    if {expect_ours}:
        import vllm.v1.worker.gpu_model_runner as runner
        eplb = SimpleNamespace(use_async=True, window_size=4, step_interval=8)
        elastic = SimpleNamespace(enable_elastic_ep=True, eplb_config=eplb)
        try:
            runner.EplbState(elastic, "cpu")
        except Exception as exc:  # vLLM's own class, built outside a worker
            assert not isinstance(exc, NotImplementedError), exc
        row = runner.EplbState.build_initial_global_physical_to_logical_map(4, 2)
        assert list(row) == [0, 1, 2, 3, 0, 1], row
    print("PLUGIN OK")
    """
)


def _run(pre_import: str, expect_ours: bool, env: dict[str, str]) -> str:
    code = _CHECK.format(pre_import=pre_import, expect_ours=expect_ours)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PLUGIN OK" in proc.stdout
    return proc.stdout


def test_plugin_replaces_eplb_state_in_modules_imported_before_and_after() -> None:
    # the v1 runner imported before the plugin loads, the others after
    _run("import vllm.v1.worker.gpu_model_runner", True, {})


def test_plugin_is_off_with_env_zero() -> None:
    _run("", False, {"VLLM_ASYNC_EPLB": "0"})
