"""Host memory of a simulated run: estimated before it starts, measured while it runs.

The estimate is a sum of named parts, each a product of the run's geometry, so
the header can say where the bytes go and a run that cannot fit is refused
before any rank starts. The measurements (``/proc``) give each rank's peak and
the memory in use when a rank dies.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

__all__ = [
    "RANK_RUNTIME_BYTES",
    "MemoryEstimate",
    "MemorySample",
    "available_bytes",
    "describe_exit",
    "estimate_memory",
    "gb",
    "process_memory",
]

RANK_RUNTIME_BYTES = 420 * 2**20
"""One rank's resident memory before its data: the interpreter and torch it
forks from the launcher, gloo, the policy's numba kernels, EplbState's
threads. Measured (peak RSS of the ranks of a run whose data is a few MiB) on
torch 2.13 CPU, Python 3.11, x86-64."""

_ALIGN = 16  # the staging buffer pads each tensor of an expert row to this


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at its peak, by part; ``total`` adds the ranks."""

    parts: dict[str, int]
    """Per rank: runtime, workspace, staging, reference, step, load window, trace."""
    ranks: int
    host: bool = True
    """False with ``--device cuda``: workspace and staging live on the GPU
    and are left out of the host figures."""

    @property
    def per_rank(self) -> int:
        device_only = () if self.host else ("workspace", "staging")
        return sum(v for k, v in self.parts.items() if k not in device_only)

    @property
    def total(self) -> int:
        return self.ranks * self.per_rank

    def describe(self) -> str:
        """The header's line: per rank by part, then the total."""
        shown = ", ".join(
            f"{name} {_size(value)}" for name, value in self.parts.items()
        )
        where = "" if self.host else " (workspace and staging on the GPU)"
        return (
            f"about {gb(self.per_rank)} GB per rank ({shown}){where}, "
            f"{gb(self.total)} GB for {self.ranks} ranks"
        )


def gb(num_bytes: float) -> str:
    """Bytes as GB (1e9) with two decimals: the unit ``free -g`` users read."""
    return f"{num_bytes / 1e9:.2f}"


def _size(num_bytes: float) -> str:
    """GB from 0.1 GB up, MB below (the small parts would all read 0.00)."""
    if num_bytes >= 1e8:
        return f"{gb(num_bytes)} GB"
    return f"{num_bytes / 1e6:.1f} MB"


def _expert_bytes(hidden: int, itemsize: int) -> int:
    """One toy expert: ``w [H, H]`` and ``bias [H]`` in the weight dtype, a
    ``uint8`` scale ``[H]``."""
    return hidden * hidden * itemsize + hidden * itemsize + hidden


def _row_bytes(hidden: int, itemsize: int) -> int:
    """One expert as the staging buffer packs it (each tensor padded)."""
    return sum(
        -(-n // _ALIGN) * _ALIGN
        for n in (hidden * hidden * itemsize, hidden * itemsize, hidden)
    )


def estimate_memory(
    *,
    layers: int,
    experts: int,
    slots: int,
    ranks: int,
    hidden: int,
    itemsize: int,
    top_k: int,
    tokens: int,
    steps: int,
    window: int,
    trace_elements: int = 0,
    host: bool = True,
) -> MemoryEstimate:
    """What one rank of the simulator holds at its peak, part by part.

    - workspace: the rank's own ``slots / ranks`` experts of every layer;
    - staging: EplbState's one-layer buffer plus the transport's packing
      scratch (at most another layer);
    - reference: verification regenerates one layer of every logical expert
      at a time (filled in place, one expert drawn at a time), never the
      whole model, and every expert's fp32 output on the step's tokens
      (``[E, T, H]``, combined for every step);
    - step: one decode step's routing draw (``[L, T, E]`` float64, three
      alive at once) and MoE output (``[L, T, H]`` fp32, twice for the
      all-reduce), plus the routing kept for verification;
    - load window: EplbState's ``window x L x P`` int64 records (and their
      copy for a rebalance), the per-step records and digests;
    - trace: a replayed trace's probabilities, mapped to the geometry
      (two loads alive, two transient arrays while one is built).
    """
    slots_per_rank = slots // ranks
    expert = _expert_bytes(hidden, itemsize)
    own_layers = -(-layers // ranks)
    parts = {
        "runtime": RANK_RUNTIME_BYTES,
        "workspace": layers * slots_per_rank * expert,
        "staging": 2 * slots_per_rank * _row_bytes(hidden, itemsize),
        "reference": (experts + 1) * expert + experts * tokens * hidden * 4,
        "step": (
            3 * layers * tokens * experts * 8
            + 2 * layers * tokens * hidden * 4
            + steps * own_layers * tokens * top_k * 8
        ),
        "load window": 2 * window * layers * slots * 8 + steps * (layers * 90 + 300),
        "trace": 4 * trace_elements * 8,
    }
    return MemoryEstimate(parts, ranks, host)


def available_bytes() -> tuple[int, str]:
    """Memory a new run can use, and where that figure comes from.

    The smaller of the kernel's ``MemAvailable`` and what the cgroup limit
    leaves (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), so a container
    limit counts even when the host has room.
    """
    found = [(_meminfo("MemAvailable"), "MemAvailable")]
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory.limit_in_bytes", "memory.usage_in_bytes"),
    ):
        cgroup = _own_cgroup_dir(limit_file)
        if cgroup is None:
            continue
        limit = _read_int(cgroup / limit_file)
        usage = _read_int(cgroup / usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            found.append((limit - usage, f"cgroup limit {gb(limit)} GB"))
        break
    usable = [(v, name) for v, name in found if v is not None]
    if not usable:
        return 0, "unknown"
    return min(usable)


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _own_cgroup_dir(limit_file: str) -> Path | None:
    """The directory of this process's memory cgroup holding ``limit_file``."""
    try:
        entries = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for entry in entries:
        _, controllers, path = entry.split(":", 2)
        if controllers in ("", "memory") or "memory" in controllers.split(","):
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")):
                candidate = root / path.lstrip("/")
                if (candidate / limit_file).is_file():
                    return candidate
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class MemorySample:
    """One process's memory now and at its peak (bytes; 0 when unreadable)."""

    rss: int
    peak_rss: int
    pss: int
    """Proportional share: shared pages split among their users, so the sum
    over processes is what they use together."""


def process_memory(pid: int | None = None, *, with_pss: bool = True) -> MemorySample:
    """``/proc`` figures of ``pid`` (this process by default)."""
    proc = Path("/proc") / (str(pid) if pid is not None else "self")
    status = {}
    try:
        for line in (proc / "status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                status[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    pss = 0
    if with_pss:
        try:
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            pss = 0
    rss = status.get("VmRSS", 0)
    return MemorySample(rss, status.get("VmHWM", rss), pss or rss)


def describe_exit(exit_code: int, in_use: int | None, rank_share: int | None) -> str:
    """Why a rank's process ended, in words, from its exit status.

    A negative code is the signal that ended it. SIGKILL is what the kernel's
    out-of-memory killer sends, so it is reported as likely out of memory
    with the memory the run had in use when it was last sampled.
    """
    if exit_code >= 0:
        return f"exited with code {exit_code}"
    try:
        sig = signal.Signals(-exit_code)
        name = f"{sig.name} ({signal.strsignal(sig) or 'signal'})"
    except ValueError:
        return f"was ended by signal {-exit_code}"
    if sig == signal.SIGKILL:
        memory = ""
        if in_use:
            memory = f": {gb(in_use)} GB in use by the run"
            if rank_share:
                memory += f", {gb(rank_share)} GB of it by this rank"
        return (
            f"was killed by {name}, killed by the system, likely out of memory{memory}"
        )
    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        return f"was stopped by {name} from outside the simulator"
    return f"crashed with {name}"
