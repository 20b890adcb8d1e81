"""Launch a script under torchrun from a test, on a free port, with a timeout.

Shared by every multi-rank test: ``run_torchrun(script, nproc, args, timeout)``
runs ``python -m torch.distributed.run`` with this interpreter (gloo on CPU),
so parallel test runs never clash on a port and a hung rank fails the test
instead of hanging it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

__all__ = ["REPO", "free_port", "run_torchrun"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(
    script: str | Path,
    nproc: int,
    args: Sequence[str] = (),
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` on ``nproc`` local ranks; raise with its output on failure.

    Returns the completed process (``stdout`` holds every rank's output).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(script),
        *args,
    ]
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
        **(env or {}),
    }
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=REPO,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"torchrun {Path(script).name} x{nproc} timed out after {timeout}s\n"
            f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}"
        ) from exc
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {Path(script).name} x{nproc} exited with {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc
