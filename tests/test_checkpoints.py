"""Checkpoints that survive crashes: atomic saves, `resume_from: latest`, pruning, no pickle, and
a run killed with SIGKILL (and one preempted with SIGTERM) that resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fire_opd.demo.tasks import sample_problems
from fire_opd.train import checkpoint, run_dir
from fire_opd.train.data import write_prompts

ASSETS = Path(__file__).resolve().parents[1] / "fire_opd" / "demo" / "assets"
STEPS = 12


def _launch(tmp_path: Path, out: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fire_opd",
            "train",
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--output-dir",
            str(tmp_path / out),
            *extra,
        ],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["train/step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_killed_and_preempted_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL after the checkpoint of step 4 (mid-training, possibly mid-save), `resume_from:
    latest`, SIGTERM after step 8 (a checkpoint at the next step boundary, exit 75), resume again:
    the final weights equal an uninterrupted run's bit for bit and every step is logged once."""
    write_prompts(sample_problems(["arith"], 32, seed=0, split="train"), tmp_path / "p.jsonl")
    config = {
        "student": str(ASSETS / "student_init"),
        "teachers": {"arith": str(ASSETS / "teacher_arith")},
        "tokenizer": str(ASSETS / "tokenizer"),
        "prompts": "p.jsonl",
        "steps": STEPS,
        "prompts_per_step": 8,
        "samples_per_prompt": 2,
        "max_new_tokens": 8,
        "warmup_steps": 2,
        "lr": 1e-3,
        "save_every": 1,
        "keep_last": 2,
        "eval_every": 0,
        "progress": False,
        "tensorboard": True,
        "threads": 1,
        "seed": 3,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))

    whole = _launch(tmp_path, "whole")
    killed = _launch(tmp_path, "resumed")
    _wait_for(tmp_path / "resumed" / "step-000004", killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "resumed" / "final").exists()

    preempted = _launch(tmp_path, "resumed", "--set", "resume_from=latest")
    _wait_for(tmp_path / "resumed" / "step-000008", preempted)
    preempted.send_signal(signal.SIGTERM)
    _, err = preempted.communicate(timeout=120)
    assert preempted.returncode == 75, err[-2000:]  # stopped with a checkpoint: resume it
    assert "resuming from" in err and "SIGTERM received: the run stops after the current step" in err
    assert err.strip().splitlines()[-1].startswith("fire-opd: stopped by SIGTERM after step")
    assert not (tmp_path / "resumed" / "final").exists()
    stopped_at = run_dir.checkpoints(tmp_path / "resumed")[-1][0]
    assert 8 <= stopped_at < STEPS

    last = _launch(tmp_path, "resumed", "--set", "resume_from=latest")
    _, err = last.communicate(timeout=300)
    assert last.returncode == 0, err[-2000:]
    assert f"step {stopped_at})" in err
    assert (
        err.strip().splitlines()[-1]
        == f"fire-opd: finished {STEPS} steps; final model {tmp_path / 'resumed' / 'final'}"
    )
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-2000:]

    a, b = (
        load_file(str(tmp_path / "whole" / "final" / "model.safetensors")),
        load_file(str(tmp_path / "resumed" / "final" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(tmp_path / "whole") == _steps(tmp_path / "resumed") == list(range(1, STEPS + 1))
    losses = [
        [json.loads(line)["train/loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "resumed")
    ]
    assert losses[0] == losses[1]
    # keep_last 2: the two newest step checkpoints and final; no partial saves, no lock left behind
    names = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert names == [
        "config.json",
        "curves.png",
        "final",
        "metrics.jsonl",
        f"step-{STEPS - 2:06d}",
        f"step-{STEPS - 1:06d}",
        "summary.json",
        "tensorboard",
    ]


class _Model:
    """Just enough of a model for `save_checkpoint`."""

    def __init__(self):
        self.weight = torch.nn.Linear(2, 2).weight

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        save_file({"weight": self.weight.detach()}, str(Path(path) / "model.safetensors"))


class _Tokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")


def _save(path: Path, step: int) -> Path:
    return checkpoint.save_checkpoint(
        path, model=_Model(), tokenizer=_Tokenizer(), state={"step": step}, tensor_state={"optimizer": {"state": {}}}
    )


def test_latest_ignores_partial_saves_and_pruning_keeps_final(tmp_path):
    assert run_dir.latest_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        _save(tmp_path / f"step-{step:06d}", step)
    (tmp_path / ".tmp-step-000008-123").mkdir()  # a save killed midway
    (tmp_path / "step-000010").mkdir()  # a folder someone made by hand: no state, not a checkpoint
    assert run_dir.latest_checkpoint(tmp_path) == tmp_path / "step-000006"
    _save(tmp_path / "final", 6)  # the final checkpoint of step 6 is newer than step-000006
    assert run_dir.latest_checkpoint(tmp_path) == tmp_path / "final"
    assert run_dir.prune_checkpoints(tmp_path, 1) == [tmp_path / "step-000002", tmp_path / "step-000004"]
    assert [p.name for _, p in run_dir.checkpoints(tmp_path)] == ["step-000006", "final"]
    assert run_dir.remove_partial_saves(tmp_path) == [tmp_path / ".tmp-step-000008-123"]
    _save(tmp_path / "final", 7)  # saving over a checkpoint replaces it whole
    assert run_dir.read_state(tmp_path / "final") == {"step": 7}
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in tmp_path.iterdir())


def test_trainer_state_loads_no_pickled_code(tmp_path):
    """optimizer.pt is read with weights_only=True: a pickle that would run code is refused."""
    path = _save(tmp_path / "step-000001", 1)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"optimizer": Exploit()}, path / checkpoint.TENSOR_STATE_FILE)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        model = torch.nn.Linear(2, 2, bias=False)
        checkpoint.load_checkpoint(
            path, model=model, optimizer=torch.optim.SGD(model.parameters()), device=torch.device("cpu")
        )
    assert not (tmp_path / "pwned").exists()
    (path / checkpoint.STATE_FILE).unlink()
    (path / "trainer_state.pt").write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="older fire-opd that stored a pickle"):
        run_dir.read_state(path)


def test_output_dir_guard_and_overwrite(tmp_path):
    run = tmp_path / "run"
    run_dir.check_output_dir(run, resume=False, overwrite=False)  # absent: fine
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    run_dir.check_output_dir(run, resume=False, overwrite=False)  # a folder without a run: fine
    _save(run / "step-000001", 1)
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="already holds a run"):
        run_dir.check_output_dir(run, resume=False, overwrite=False)
    run_dir.check_output_dir(run, resume=True, overwrite=False)
    run_dir.clear_run(run)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]  # only what a run writes is removed


def test_a_second_interrupt_stops_at_once_and_keeps_the_checkpoints(tmp_path):
    """Ctrl-C twice: the first says the run will stop after the step, the second stops it at once
    (exit 130, its own last line), and the newest complete checkpoint is intact and resumes."""
    write_prompts(sample_problems(["arith"], 128, seed=0, split="train"), tmp_path / "p.jsonl")
    # Steps long enough (64 rollouts of up to 16 tokens, about half a second here) that both signals
    # land inside step 3: with 8 rollouts of 8 tokens a step took about as long as the 50 ms between
    # them, and a first signal at the step boundary ended the run (exit 75) before the second came.
    config = {
        "models": {"student": str(ASSETS / "student_init"), "teachers": {"arith": str(ASSETS / "teacher_arith")},
                   "tokenizer": str(ASSETS / "tokenizer")},
        "data": {"prompts": "p.jsonl"},
        "optim": {"steps": 200}, "sampling": {"prompts_per_step": 64, "max_new_tokens": 16},
        "checkpoint": {"save_every": 1}, "eval": {"every": 0}, "logging": {"progress": False, "report_to": []},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    run = _launch(tmp_path, "run")
    _wait_for(tmp_path / "run" / "step-000002", run)
    time.sleep(0.1)  # past step 2's bookkeeping, into step 3
    run.send_signal(signal.SIGINT)
    time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()
    assert any("SIGINT received: the run stops after the current step" in line for line in lines)
    assert lines[-1].startswith("fire-opd: aborted by"), lines[-1]
    newest = run_dir.latest_checkpoint(tmp_path / "run")
    assert newest is not None and run_dir.read_state(newest)["step"] >= 2
    assert not (tmp_path / "run" / run_dir.LOCK_FILE).exists()  # an aborted run releases its directory
    resumed = _launch(
        tmp_path, "run", "--set", "checkpoint.resume_from=latest", "--set", "optim.steps=4",
        "--set", "checkpoint.allow_config_change=true",
    )  # fmt: skip
    _, err = resumed.communicate(timeout=300)
    assert "resuming from" in err and "taking over the lock" not in err
    assert resumed.returncode == 0, err[-2000:]
