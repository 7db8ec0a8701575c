"""A run's output directory: what it holds, who may write to it, and how a run stops.

    output_dir/
        config.json, metrics.jsonl, tensorboard/, config-history.jsonl, summary.json, curves.png
        step-000040/, final/ (checkpoints: fire_opd/train/checkpoint.py writes and reads them)
        final-merged/        a LoRA run's merged student
        .fire-opd.lock       the live run that holds the directory

The guard (`check_output_dir`: a new run refuses a directory that holds one), the lock (one
live run per directory, taken over from a dead one), the listing of complete checkpoints, the
stop signals and the policy for a resume that changes the config (`check_resume`, refused
unless allowed, then recorded in config-history.jsonl) live here. This module imports no torch,
so the command line's checks answer before torch loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from fire_opd.errors import UsageError

logger = logging.getLogger("fire_opd")

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
_CHECKPOINT_NAME = re.compile(r"^(step-\d+|final)$")
# What a run writes into its output directory (a new run refuses a directory that holds any).
CONFIG_HISTORY_FILE = "config-history.jsonl"
SUMMARY_FILE, CURVES_FILE = "summary.json", "curves.png"
MERGED_DIR = "final-merged"  # a LoRA run's merged student (lora.merge_lora)
RUN_FILES = ("config.json", METRICS_FILE, "tensorboard", CONFIG_HISTORY_FILE, SUMMARY_FILE, CURVES_FILE, MERGED_DIR)


def read_state(path: str | Path) -> dict:
    """trainer_state.json of a checkpoint, with a clear error if `path` is not one."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        old = (path / "trainer_state.pt").is_file()
        raise FileNotFoundError(
            f"{path} is not a fire-opd checkpoint (no {STATE_FILE})"
            + (
                "; it was written by an older fire-opd that stored a pickle, which this version does not load"
                if old
                else ""
            )
        )
    return json.loads(state_file.read_text())


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        if child.is_dir() and _CHECKPOINT_NAME.match(child.name) and (child / STATE_FILE).is_file():
            step = int(read_state(child)["step"]) if child.name == "final" else int(child.name.split("-")[1])
            found.append((step, child))
    return sorted(found, key=lambda item: (item[0], item[1].name == "final"))


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint in `output_dir`, or None."""
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step-* checkpoints ("final" is always kept)."""
    if keep_last <= 0:
        return []
    steps = [path for _, path in checkpoints(output_dir) if path.name != "final"]
    doomed = steps[:-keep_last]
    for path in doomed:  # renamed first, so a kill mid-delete leaves no half checkpoint under its name
        trash = path.parent / f".old-{path.name}-{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash)
    return doomed


def holds_a_run(output_dir: str | Path) -> bool:
    """Whether `output_dir` already holds a fire-opd run (its config, metrics or checkpoints)."""
    output_dir = Path(output_dir)
    return output_dir.is_dir() and (
        any((output_dir / name).exists() for name in RUN_FILES)
        or any(_CHECKPOINT_NAME.match(c.name) for c in output_dir.iterdir())
    )


def check_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """A new run into a directory that holds a run is refused unless it resumes or overwrites."""
    if not resume and not overwrite and holds_a_run(output_dir):
        raise FileExistsError(
            f"output_dir {output_dir} already holds a run; resume it with checkpoint.resume_from: latest "
            "(--set checkpoint.resume_from=latest), pass --overwrite to replace it, or choose another "
            "--output-dir"
        )


LOCK_FILE = ".fire-opd.lock"


STALE_LOCK_SECONDS = 600.0  # a lock from another machine not refreshed for this long is a dead run's


def lock_run(output_dir: str | Path) -> None:
    """Claim `output_dir` for this process, or refuse in one line when a live run holds it.

    The lock holds the holder's host and pid and is refreshed every step (`refresh_lock`). A lock
    of a process that is gone (on this machine), or one from another machine that has not been
    refreshed for STALE_LOCK_SECONDS (a preempted job re-queued elsewhere), is taken over with a
    warning."""
    path = Path(output_dir) / LOCK_FILE
    host, pid = socket.gethostname(), os.getpid()
    if path.is_file():
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError):
            held = {}
        holder = f"pid {held.get('pid')} on {held.get('host')}"
        if held.get("host") == host and held.get("pid") == pid:
            pass  # ours
        elif held.get("host") == host and _alive(held.get("pid")):
            raise UsageError(f"output_dir {output_dir} is in use by a live run ({holder}); wait for it to end or "
                             "choose another --output-dir")  # fmt: skip
        elif held.get("host") != host and time.time() - path.stat().st_mtime < STALE_LOCK_SECONDS:
            raise UsageError(f"output_dir {output_dir} is in use by a run on another machine ({holder}, active "
                             f"{time.time() - path.stat().st_mtime:.0f} s ago); wait for it to end or choose another "
                             "--output-dir")  # fmt: skip
        else:
            logger.warning("output_dir %s: taking over the lock of a run that is gone (%s)", output_dir, holder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{LOCK_FILE}.{pid}")
    tmp.write_text(json.dumps({"host": host, "pid": pid, "since": time.time()}))
    os.replace(tmp, path)


def refresh_lock(output_dir: str | Path) -> None:
    """Mark the lock of `output_dir` as held by a live run (its modification time)."""
    path = Path(output_dir) / LOCK_FILE
    if path.is_file():
        os.utime(path)


def unlock_run(output_dir: str | Path) -> None:
    """Release `output_dir` if this process holds it."""
    path = Path(output_dir) / LOCK_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def clear_run(output_dir: str | Path) -> None:
    """Remove what a previous run wrote into `output_dir` (for `overwrite`); nothing else."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for child in output_dir.iterdir():
        if child.name in RUN_FILES or _CHECKPOINT_NAME.match(child.name):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    remove_partial_saves(output_dir)


def resolve_resume(resume_from: str, output_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from: "latest" is the newest complete one in `output_dir` (None,
    with a warning, when there is none yet: a re-queued job starts at step 0)."""
    if resume_from != "latest":
        return Path(resume_from)
    path = latest_checkpoint(output_dir)
    if path is None:
        logger.warning(
            "checkpoint.resume_from: latest found no complete checkpoint in %s; starting at step 0", output_dir
        )
    return path


@contextmanager
def stop_signals(announce: bool = True):
    """Record SIGTERM / SIGINT (a cluster preempting the job, Ctrl-C) instead of dying mid-step, so
    the trainer can checkpoint at the next step boundary, and say so at once (`announce`: this
    process speaks for the run). A second signal raises KeyboardInterrupt there and then: the run
    stops without a new checkpoint, the complete ones stay as they are (saves are atomic). Main
    thread only; elsewhere a no-op."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if received:
            raise KeyboardInterrupt(f"a second {name}")
        received.append(name)
        if announce:
            print(
                f"fire-opd: {name} received: the run stops after the current step with a checkpoint; "
                f"{'Ctrl-C' if signum == signal.SIGINT else name} again stops it at once",
                file=sys.stderr,
                flush=True,
            )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def remove_partial_saves(output_dir: str | Path) -> list[Path]:
    """Delete the `.tmp-*` / `.old-*` folders a save killed midway left behind."""
    output_dir = Path(output_dir)
    doomed = (
        [c for c in output_dir.iterdir() if c.is_dir() and c.name.startswith((".tmp-", ".old-"))]
        if output_dir.is_dir()
        else []
    )
    for path in doomed:
        logger.warning("removing %s, left by a save that did not finish", path)
        shutil.rmtree(path)
    return doomed


# ----------------------------------------------------------------------------- resuming with a changed config


def check_resume(path: str | Path, config) -> list[tuple[str, object, object]]:
    """The changes of `config` against the one the checkpoint at `path` was written with, among
    the fields that define a run: refused in one line listing each (old -> new) unless
    `checkpoint.allow_config_change`, else returned (to be logged and kept)."""
    saved = read_state(path).get("config", {})
    changes = config.changes_from(saved)
    if changes and not config.checkpoint.allow_config_change:
        listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
        raise UsageError(
            f"checkpoint.resume_from: {path} was written with another config ({listed}); resume with the same "
            "config, or set checkpoint.allow_config_change: true to continue with the changes"
        )
    return changes


def record_config_changes(output_dir: str | Path, step: int, changes: list) -> None:
    """Append the changes a resume made to output_dir/config-history.jsonl."""
    if not changes:
        return
    entry = {"step": step, "time": time.time(), "changes": {key: [old, new] for key, old, new in changes}}
    with (Path(output_dir) / CONFIG_HISTORY_FILE).open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def fsync_tree(folder: Path) -> None:
    """Flush a folder written for an atomic rename (its files, then the folder itself) to disk."""
    for child in folder.iterdir():
        if child.is_file():
            with child.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
