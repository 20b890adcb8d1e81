"""Why does an IPC pull on one GPU run below the local copy rate? Copy modes.

Two processes share GPU 0; rank 1 opens rank 0's layer (9 x 44 MB uint8) through
CUDA IPC and copies it, and its own layer locally, two ways each:
``copy_`` (cudaMemcpyAsync) and an elementwise kernel over int64 views
(``torch.add(src, 0, out=dst)``, bit-exact for integers). Prints GB/s one way.

    python benchmarks/eplb/gpu/ipc_copy_modes.py
"""

from __future__ import annotations

import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.reductions import reduce_tensor

ROWS, ROW_BYTES = 9, 44_040_192


def timed(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def rank_main(rank: int, store_path: str) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2
    )
    mine = torch.randint(0, 255, (ROWS, ROW_BYTES), dtype=torch.uint8, device="cuda")
    handles = [None, None]
    dist.all_gather_object(handles, reduce_tensor(mine))
    if rank == 1:
        rebuild, args = handles[0]
        peer = rebuild(*args)
        dst = torch.empty_like(mine)
        modes = {
            "local copy_": lambda: dst.copy_(mine),
            "local kernel": lambda: torch.add(
                mine.view(torch.int64), 0, out=dst.view(torch.int64)
            ),
            "ipc copy_": lambda: dst.copy_(peer),
            "ipc kernel": lambda: torch.add(
                peer.view(torch.int64), 0, out=dst.view(torch.int64)
            ),
        }
        for name, fn in modes.items():
            ms = timed(fn)
            exact = torch.equal(dst, peer if "ipc" in name else mine)
            print(
                f"{name:13s} {ms:.3f} ms  {mine.numel() / ms / 1e6:7.0f} GB/s "
                f"one way  bit-exact {exact}",
                flush=True,
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    path = tempfile.mktemp(prefix="ipc-modes-")
    mp.spawn(rank_main, args=(path,), nprocs=2)
