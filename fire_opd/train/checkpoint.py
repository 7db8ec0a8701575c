"""Checkpoints that survive crashes, and the output directory they live in.

A checkpoint is a folder `output_dir/step-000040` (or `final`) holding

    model.safetensors, config.json, tokenizer files   the student, in Hugging Face format
    trainer_state.json      step, skipped steps, history, config, scheduler and Python RNG
    optimizer.pt            optimizer state and torch RNG states: tensors only, read back with
                            torch.load(weights_only=True), so loading runs no pickled code

It is written to a hidden temporary folder, flushed to disk, and renamed into place in one
`os.replace`: a folder named like a checkpoint is always complete, and a kill during a save
leaves only a `.tmp-*` folder that the next save or `resume_from: latest` ignores.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fire_opd.errors import UsageError
from fire_opd.ops.heads import is_peft

logger = logging.getLogger("fire_opd")

STATE_FILE = "trainer_state.json"
TENSOR_STATE_FILE = "optimizer.pt"
METRICS_FILE = "metrics.jsonl"
_CHECKPOINT_NAME = re.compile(r"^(step-\d+|final)$")
# What a run writes into its output directory (a new run refuses a directory that holds any).
CONFIG_HISTORY_FILE = "config-history.jsonl"
SUMMARY_FILE, CURVES_FILE = "summary.json", "curves.png"
MERGED_DIR = "final-merged"  # a LoRA run's merged student (lora.merge_lora)
RUN_FILES = ("config.json", METRICS_FILE, "tensorboard", CONFIG_HISTORY_FILE, SUMMARY_FILE, CURVES_FILE, MERGED_DIR)


def save_checkpoint(
    path: str | Path, *, model, tokenizer, state: dict, tensor_state: dict, weights: Optional[dict] = None
) -> Path:
    """Write a checkpoint atomically. `state` must be JSON-serializable; `tensor_state` holds
    tensors (and plain containers of numbers) only; `weights`: the model's full state dict when
    its parameters are sharded (FSDP), else the model's own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    options: dict = {"save_embedding_layers": False} if is_peft(model) else {}  # a LoRA student: its adapters
    if weights is not None:
        model.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True, **options)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True, **options)
    tokenizer.save_pretrained(str(tmp))
    torch.save(tensor_state, tmp / TENSOR_STATE_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state))
    _fsync_tree(tmp)
    if path.exists():  # re-saving a step (e.g. "final" of a finished run resumed to more steps)
        old = path.parent / f".old-{path.name}-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


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


def load_checkpoint(path: str | Path, *, model, optimizer=None, device: torch.device) -> tuple[dict, dict]:
    """Load the student's weights (and the optimizer state) from `path` into `model` (plain, DDP's
    module or FSDP-sharded); return (state, tensor_state)."""
    from safetensors.torch import load_file

    from fire_opd.parallel.distributed import load_full_state_dicts

    path = Path(path)
    state = read_state(path)
    weights = {}
    for shard in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(shard), device="cpu"))
    if is_peft(model):  # adapters only, named as peft saves them
        from peft import get_peft_model_state_dict

        names = set(get_peft_model_state_dict(model))
        tied: set = set()
    else:
        names = set(model.state_dict())
        tied = set(getattr(model, "_tied_weights_keys", None) or [])  # a tied head is saved once, as its embedding
    missing = sorted(names - set(weights) - tied)
    unexpected = sorted(set(weights) - names)
    if missing or unexpected:
        raise UsageError(
            f"checkpoint {path} does not fit the student: {len(missing)} of its weights missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}); resume it with the student it was "
            "trained from"
        )
    tensor_state = torch.load(path / TENSOR_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer_state = tensor_state["optimizer"] if optimizer is not None else None
    from fire_opd.parallel.sharded_head import slice_state

    slice_state(model, weights, optimizer_state or {})  # this process's rows of whole lm_heads (vocab_parallel)
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        weights = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    load_full_state_dicts(model, optimizer, weights, optimizer_state or {})
    return state, tensor_state


def save_merged(path: str | Path, *, student, tokenizer) -> Path:
    """A LoRA student's adapters merged into a copy of its weights, written atomically as a plain
    model folder (`from_pretrained` loads it without peft); the student keeps its adapters."""
    import copy

    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    copy.deepcopy(student).merge_and_unload().save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


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


def rng_state() -> tuple[dict, dict]:
    """(JSON part, tensor part) of the Python and torch RNG states."""
    version, internal, gauss = random.getstate()
    tensors: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return {"version": version, "internal": list(internal), "gauss": gauss}, tensors


def set_rng_state(state: dict, tensors: dict) -> None:
    random.setstate((state["version"], tuple(state["internal"]), state["gauss"]))
    torch.set_rng_state(tensors["torch"].cpu())
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in tensors["cuda"]])


def _fsync_tree(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_file():
            with child.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- a training run's checkpoints


@dataclass
class TrainState:
    """What a resume needs besides the weights, the optimizer and the schedule: where the run is
    and what it logged. Saved in trainer_state.json with the scheduler, the RNG states, the
    config and the number of processes that wrote it."""

    step: int = 0  # optimizer steps done
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    history: list[dict] = field(default_factory=list)  # every step's metrics
    initial_eval: dict = field(default_factory=dict)  # the initial student's evaluation (eval.at_start)
    seconds: float = 0.0  # training time so far, over every resume


def save_training_checkpoint(
    path: str | Path, *, state: TrainState, config, student, tokenizer, optimizer, scheduler, parallel
) -> Path:
    """The student and tokenizer in Hugging Face format plus the trainer's state, written
    atomically by rank 0; then prunes step checkpoints beyond `checkpoint.keep_last`. Weights and
    optimizer state are saved whole (gathered from the shards under FSDP or parallel.vocab), so
    one copy serves a resume with any number of processes and either mode, and the model folder
    loads into a single process with `from_pretrained`. Every process calls it."""
    from fire_opd.parallel import distributed, sharded_head

    path = Path(path)
    weights, optimizer_state = distributed.full_state_dicts(student, optimizer)  # all ranks (FSDP)
    sharded_head.gather_state(student, optimizer, weights, optimizer_state)  # whole lm_heads (parallel.vocab)
    if parallel.is_main:
        python_rng, tensor_rng = rng_state()
        saved = {
            "step": state.step,
            "skipped_steps": state.skipped_steps,
            "history": state.history,
            "initial_eval": state.initial_eval,
            "seconds": state.seconds,
            "config": config.to_dict(),
            "scheduler": scheduler.state_dict(),
            "python_rng": python_rng,
            "world_size": parallel.world_size,
        }
        save_checkpoint(
            path,
            model=student,
            tokenizer=tokenizer,
            state=saved,
            tensor_state={"optimizer": optimizer_state, "rng": tensor_rng},
            weights=weights,
        )
        if path.parent == Path(config.output_dir):
            prune_checkpoints(config.output_dir, config.checkpoint.keep_last)
    distributed.barrier()
    return path


def load_training_checkpoint(path: str | Path, *, student, optimizer, scheduler, parallel) -> TrainState:
    """Weights, optimizer, schedule and RNG states from a checkpoint; returns the run's state."""
    saved, tensors = load_checkpoint(path, model=student, optimizer=optimizer, device=parallel.device)
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["python_rng"], tensors["rng"])
    written_by = saved.get("world_size", 1)
    if written_by != parallel.world_size and parallel.is_main:
        # rollouts depend on (seed, step, chunk) only, so the run continues as it would have
        logger.warning(
            "checkpoint %s was written by %d process(es), resuming with %d: the rollouts and statistics are the "
            "same; parameters agree up to floating-point reduction order",
            path,
            written_by,
            parallel.world_size,
        )
    return TrainState(
        step=saved["step"],
        skipped_steps=saved["skipped_steps"],
        history=saved["history"],
        initial_eval=saved.get("initial_eval", {}),  # absent from checkpoints of fire-opd 0.1
        seconds=saved.get("seconds", 0.0),
    )
