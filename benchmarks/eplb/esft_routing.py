"""Per-token routing of DeepSeek-V2-Lite from the ESFT logs (``shared/data``).

The archive ``per_token_routing.tar.gz`` holds, per task and MoE layer
``L`` (1..26), ``results/expert_scores/TASK/expert_weights_L.txt``: one line
per sequence, the top-6 expert ids of its tokens (tab-separated), two tabs,
then the gate weights (ignored here). See the data's README for source and
licence (github.com/deepseek-ai/ESFT, MIT).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_ARCHIVE", "TOP_K", "load_topk"]

DEFAULT_ARCHIVE = (
    Path(__file__).resolve().parents[3]
    / "shared/data/esft-deepseek-v2-lite/per_token_routing.tar.gz"
)
TOP_K = 6
NUM_LAYERS = 26


def load_topk(tasks: tuple[str, ...], archive: Path = DEFAULT_ARCHIVE) -> dict:
    """``{task: [L] arrays [tokens, 6] int64}``, layers in order."""
    if not archive.is_file():
        raise FileNotFoundError(f"per-token routing archive not found: {archive}")
    wanted = {
        f"results/expert_scores/{task}/expert_weights_{layer}.txt": (task, layer)
        for task in tasks
        for layer in range(1, NUM_LAYERS + 1)
    }
    found: dict[str, dict[int, np.ndarray]] = {task: {} for task in tasks}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            key = wanted.get(member.name)
            if key is None:
                continue
            text = tar.extractfile(member).read().decode()
            rows = [
                np.array(line.split("\t\t")[0].split("\t"), dtype=np.int64)
                for line in text.splitlines()
                if line.strip()
            ]
            ids = np.concatenate(rows)
            if ids.size % TOP_K:
                raise ValueError(f"{member.name}: {ids.size} ids, not a multiple of 6")
            found[key[0]][key[1]] = ids.reshape(-1, TOP_K)
    missing = [name for name, key in wanted.items() if key[1] not in found[key[0]]]
    if missing:
        raise ValueError(f"archive {archive} lacks {missing[:3]}")
    return {
        task: [layers[layer] for layer in range(1, NUM_LAYERS + 1)]
        for task, layers in found.items()
    }
