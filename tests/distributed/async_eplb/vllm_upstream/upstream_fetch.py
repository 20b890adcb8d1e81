"""Fetch test files of vLLM's own test suite, once, into a git-ignored cache.

vLLM's wheels carry no tests; its source distribution on PyPI does. This
downloads that tarball (about 45 MB) through PyPI's simple API (its JSON form,
PEP 691), checks the sha256 PyPI lists for it, and extracts only the requested
files. Nothing of vLLM is committed to this repository; a file already in the
cache is not downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

SIMPLE_INDEX = "https://pypi.org/simple/vllm/"
_JSON = "application/vnd.pypi.simple.v1+json"
_TIMEOUT_S = 120


def sdist_location(version: str) -> tuple[str, str]:
    """``(url, sha256)`` of ``vllm-{version}.tar.gz`` as PyPI lists it."""
    request = urllib.request.Request(SIMPLE_INDEX, headers={"Accept": _JSON})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        listing = json.load(response)
    filename = f"vllm-{version}.tar.gz"
    for entry in listing["files"]:
        if entry["filename"] == filename:
            return entry["url"], entry["hashes"]["sha256"]
    raise LookupError(f"PyPI lists no source distribution {filename!r}")


def _download(url: str, target: Path) -> str:
    """Write ``url`` to ``target``; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with (
        urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response,
        target.open("wb") as out,
    ):
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def fetch_test_files(
    version: str, members: Sequence[str], cache_dir: Path
) -> list[Path]:
    """Paths of ``members`` (e.g. ``tests/distributed/test_eplb_algo.py``) of
    vLLM ``version``'s source tree, under ``cache_dir/vllm-{version}/``."""
    dest = cache_dir / f"vllm-{version}"
    paths = [dest / member for member in members]
    if all(path.is_file() for path in paths):
        return paths
    url, expected = sdist_location(version)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"vllm-{version}.tar.gz"
        actual = _download(url, archive)
        if actual != expected:
            raise RuntimeError(
                f"{url}: sha256 {actual} differs from {expected} listed by PyPI"
            )
        with tarfile.open(archive) as tar:
            for member, path in zip(members, paths, strict=True):
                name = f"vllm-{version}/{member}"
                try:
                    source = tar.extractfile(name)
                except KeyError:
                    source = None
                if source is None:
                    raise LookupError(f"{archive.name} holds no file {name!r}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(source.read())
    return paths
