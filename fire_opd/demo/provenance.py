"""Where a result came from: the code, the assets and the commit it ran on.

The study caches every run under a key made of everything that decides it (the job, the whole
TrainConfig, the hashes of the setting's asset folders, the package version and a hash of the
package's source). A cached result carries the commit and date it ran on; one whose key no
longer matches is never read back as today's (the study runs it again, or reports it as stale).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Iterable

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages)
SOURCE_PACKAGES = ("fire_opd", "fire_kernels")
# Data only; everything in it reaches a run's key through its config, its job or its assets' hashes
# (see the module's docstring), so a recipe chosen on validation keeps the runs that chose it.
NOT_HASHED = ("fire_opd/demo/recipes.py",)


def _hash_files(paths: Iterable[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=None)
def code_hash() -> str:
    """Hash of every .py file of fire_opd and fire_kernels (but NOT_HASHED): changes whenever the
    code that runs does."""
    files = [
        p
        for name in SOURCE_PACKAGES
        for p in (PACKAGE_ROOT / name).rglob("*.py")
        if "__pycache__" not in p.parts and p.relative_to(PACKAGE_ROOT).as_posix() not in NOT_HASHED
    ]
    return _hash_files(files, PACKAGE_ROOT)


@lru_cache(maxsize=None)
def folder_hash(folder: str | Path) -> str:
    """Hash of the files under an asset folder (weights, config, tokenizer)."""
    folder = Path(folder)
    return _hash_files([p for p in folder.rglob("*") if p.is_file()], folder)


@lru_cache(maxsize=None)
def package_version() -> str:
    try:
        return metadata.version("fire-opd")
    except metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=None)
def git_commit() -> str:
    """HEAD's short hash, with "+dirty" when the package's source differs from it; "unknown"
    outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--", *SOURCE_PACKAGES)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def run_key(parts: dict) -> str:
    """The cache key of a run: a hash of `parts` (JSON) with the package version and code hash."""
    payload = {**parts, "version": package_version(), "code": code_hash()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def stamp() -> dict:
    """What a result records about where it ran."""
    return {
        "commit": git_commit(),
        "code_hash": code_hash(),
        "version": package_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
