"""Checkpoints that survive crashes (the output directory they live in: fire_opd/train/run_dir.py).

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
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fire_opd.errors import UsageError
from fire_opd.ops.heads import is_peft
from fire_opd.train.run_dir import STATE_FILE, fsync_dir, fsync_tree, prune_checkpoints, read_state

logger = logging.getLogger("fire_opd")

TENSOR_STATE_FILE = "optimizer.pt"


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
    fsync_tree(tmp)
    if path.exists():  # re-saving a step (e.g. "final" of a finished run resumed to more steps)
        old = path.parent / f".old-{path.name}-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


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


# ----------------------------------------------------------------------------- a training run's checkpoints


@dataclass
class TrainState:
    """What a resume needs besides the weights, the optimizer and the schedule: where the run is
    and what its summary reports. Saved in trainer_state.json with the scheduler, the RNG states,
    the config and the number of processes that wrote it. The per-step metrics (`history`) are
    not saved with every checkpoint, which would grow with the run: they are metrics.jsonl's
    rows, read back on resume."""

    step: int = 0  # optimizer steps done
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    history: list[dict] = field(default_factory=list)  # every step's metrics (this process's run, and on resume
    #                                                    the rows of metrics.jsonl up to the checkpoint)
    initial_eval: dict = field(default_factory=dict)  # the initial student's evaluation (eval.at_start)
    last_eval: dict = field(default_factory=dict)  # the metrics row of the latest evaluation
    tokens: float = 0.0  # response tokens trained on so far, over every resume
    seconds: float = 0.0  # training time so far, over every resume

    def record(self, metrics: dict) -> None:
        """One step's metrics."""
        self.history.append(metrics)
        self.tokens += metrics.get("train/tokens", 0.0)
        if "eval/accuracy" in metrics:
            self.last_eval = {k: v for k, v in metrics.items() if k.startswith("eval/") or k == "train/step"}


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
            "last_eval": state.last_eval,
            "tokens": state.tokens,
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


def load_training_checkpoint(
    path: str | Path, *, student, optimizer, scheduler, parallel, metrics_file: Optional[Path] = None
) -> TrainState:
    """Weights, optimizer, schedule and RNG states from a checkpoint; returns the run's state,
    its history the rows of `metrics_file` (the run's metrics.jsonl) up to the checkpoint's step."""
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
    step = saved["step"]
    history = saved.get("history")  # checkpoints of fire-opd <= 0.1 carry it
    if history is None:
        history = _logged_rows(metrics_file, step)
    evaluated = [row for row in history if "eval/accuracy" in row]
    return TrainState(
        step=step,
        skipped_steps=saved["skipped_steps"],
        history=history,
        initial_eval=saved.get("initial_eval", {}),  # absent from checkpoints of fire-opd 0.1
        last_eval=saved.get("last_eval", evaluated[-1] if evaluated else {}),
        tokens=saved.get("tokens", sum(row.get("train/tokens", 0.0) for row in history)),
        seconds=saved.get("seconds", 0.0),
    )


def _logged_rows(metrics_file: Optional[Path], step: int) -> list[dict]:
    """The step rows (train/step 1..step) of a metrics.jsonl, or none when it is not there (a
    checkpoint resumed into another output_dir)."""
    if metrics_file is None or not Path(metrics_file).is_file():
        return []
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    return [row for row in rows if 0 < row.get("train/step", 0) <= step]
