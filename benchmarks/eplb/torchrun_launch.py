"""Re-run a benchmark script under torchrun on a free local port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def relaunch_under_torchrun(script: str, num_ranks: int) -> int:
    """Start ``num_ranks`` copies of ``script`` (with this process's arguments).

    One OpenMP thread per rank: the ranks share the machine's few cores.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={num_ranks}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        script,
        *sys.argv[1:],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.call(cmd, env=env)
