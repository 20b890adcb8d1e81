"""Run the installed vLLM's own EPLB tests against async_eplb's functions, or,
as a control, against vLLM's own.

    python tests/distributed/async_eplb/vllm_upstream/run_upstream.py \
        [--against async_eplb|vllm] [PYTEST_ARGS...]

The tests are those of the installed vLLM version, taken from its source
distribution on PyPI (``upstream_fetch``) into ``.vllm-upstream-tests/`` at the
repository root (git-ignored; ``ASYNC_EPLB_UPSTREAM_CACHE`` overrides it) and
reused from there. ``upstream_patch`` says which functions are replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
from upstream_fetch import fetch_test_files
from upstream_patch import AsyncEplbInPlaceOfVllm

# The files of vLLM's tests/ that run on a CPU machine and exercise what
# async_eplb replaces (the placement policy and the map derivation).
TEST_FILES = ("tests/distributed/test_eplb_algo.py",)
REPO = Path(__file__).resolve().parents[4]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--against",
        choices=("async_eplb", "vllm"),
        default="async_eplb",
        help="whose functions vLLM's tests call (default: async_eplb's)",
    )
    args, pytest_args = parser.parse_known_args(argv)
    import vllm

    version = vllm.__version__.split("+")[0]
    cache = Path(
        os.environ.get("ASYNC_EPLB_UPSTREAM_CACHE", REPO / ".vllm-upstream-tests")
    )
    paths = fetch_test_files(version, TEST_FILES, cache)
    print(f"vLLM {version}'s {', '.join(TEST_FILES)}, against {args.against}")
    plugins = [AsyncEplbInPlaceOfVllm()] if args.against == "async_eplb" else []
    return pytest.main(
        [*map(str, paths), "-q", "-ra", "-p", "no:cacheprovider", *pytest_args],
        plugins=plugins,
    )


if __name__ == "__main__":
    sys.exit(main())
