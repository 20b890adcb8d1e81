"""A commit made with ``wake=False`` resumes staging only at ``wake()``.

The engine commits inside its step and wakes the staging thread at the step's
end, so that the thread's Python does not take the GIL from the rest of the
step (issue 13). Same in-process world as ``test_worker.py``.
"""

from __future__ import annotations

import time

import torch
from test_worker import NUM_LAYERS, World


def test_staging_resumes_only_when_woken_and_stays_bit_exact() -> None:
    world = World(seed=7, ring_size=1)
    try:
        world.submit(range(NUM_LAYERS))
        world.wait_staged(0)
        for r, w in enumerate(world.workers):
            w.commit_layer(0, world.maps[r], torch.tensor(world.new[0]), wake=False)
        time.sleep(0.2)  # the one ring slot is free, but nobody was told
        assert all(w.staged_layers() == [] for w in world.workers)
        assert all(w.busy for w in world.workers)
        for w in world.workers:
            w.wake()
            w.wake()  # a second wake with nothing committed is a no-op
        world.wait_staged(1)
        for layer in range(1, NUM_LAYERS):
            if layer > 1:
                world.wait_staged(layer)
            world.commit(layer)
        for layer in range(NUM_LAYERS):
            world.assert_layer(layer, world.new[layer])
        assert not any(w.busy for w in world.workers)
    finally:
        world.stop()
