"""Safe resume: a checkpoint resumes only the run that wrote it (or with the changes allowed and
recorded), a finished run stays finished, one live run per output directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
from fire_opd.errors import UsageError
from fire_opd.train import run_dir
from fire_opd.train.config import TrainConfig
from fire_opd.train.trainer import FireOPDTrainer

TOKENIZER = build_char_tokenizer(TASK_ALPHABET)


def _trainer(tmp_path, **values):
    def model(seed, hidden=32):
        ids = dict(pad_id=TOKENIZER.pad_token_id, eos_id=TOKENIZER.eos_token_id)
        return tiny_llama(len(TOKENIZER), hidden, 1, 2, seed=seed, **ids)

    base = {
        "output_dir": str(tmp_path / "run"), "optim.steps": 3, "sampling.prompts_per_step": 2,
        "sampling.samples_per_prompt": 2, "sampling.max_new_tokens": 4, "checkpoint.save_every": 1,
        "logging.progress": False, "logging.report_to": [], "eval.every": 0,
    }  # fmt: skip
    student = values.pop("student", None) or model(0)
    return FireOPDTrainer(
        TrainConfig.from_dict({**base, **values}), student=student, teachers={"arith": model(1)},
        tokenizer=TOKENIZER, train_problems=sample_problems(["arith"], 16, seed=1, split="train"),
    )  # fmt: skip


def test_a_changed_run_is_refused_listing_each_change(tmp_path):
    _trainer(tmp_path).train(until_step=2)
    with pytest.raises(UsageError) as refused:
        _trainer(tmp_path, **{"checkpoint.resume_from": "latest", "fire.method": "opd", "optim.lr": 3e-4})
    message = str(refused.value)
    assert "step-000002 was written with another config (" in message
    assert "fire.method: 'fire' -> 'opd'" in message and "optim.lr: 0.0001 -> 0.0003" in message
    assert "checkpoint.allow_config_change: true" in message
    # what does not define the run may change: evaluation, logging, checkpoints
    _trainer(tmp_path, **{"checkpoint.resume_from": "latest", "eval.every": 5, "checkpoint.keep_last": 1})


def test_allowed_changes_are_logged_and_kept_in_the_history(tmp_path, caplog):
    _trainer(tmp_path).train(until_step=2)
    resumed = _trainer(
        tmp_path, **{"checkpoint.resume_from": "latest", "optim.steps": 4, "checkpoint.allow_config_change": True}
    )
    assert any("resumed with a changed config: optim.steps 3 -> 4" in r.getMessage() for r in caplog.records)
    history = [json.loads(line) for line in (tmp_path / "run" / run_dir.CONFIG_HISTORY_FILE).read_text().splitlines()]
    assert history == [{"step": 2, "time": history[0]["time"], "changes": {"optim.steps": [3, 4]}}]
    assert len(resumed.train()) == 4


def test_resuming_a_finished_run_changes_nothing(tmp_path, caplog):
    _trainer(tmp_path).train()
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != run_dir.LOCK_FILE}
    finished = _trainer(tmp_path, **{"checkpoint.resume_from": "latest"})
    assert len(finished.train()) == 3
    assert any("already finished (step 3 of 3): nothing to do" in r.getMessage() for r in caplog.records)
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != run_dir.LOCK_FILE}
    assert after == before


def test_a_checkpoint_of_another_student_is_one_usage_error(tmp_path):
    _trainer(tmp_path).train(until_step=1)
    other = tiny_llama(len(TOKENIZER), 48, 2, 2, seed=5, pad_id=TOKENIZER.pad_token_id, eos_id=TOKENIZER.eos_token_id)
    with pytest.raises(
        UsageError, match=r"does not fit the student: .* resume it with the student it was trained from"
    ):
        _trainer(tmp_path, student=other, **{"checkpoint.resume_from": "latest"})


def test_one_live_run_per_output_directory(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / run_dir.LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": live.pid}))
        with pytest.raises(UsageError, match=rf"is in use by a live run \(pid {live.pid} on"):
            _trainer(tmp_path)
    finally:
        live.kill()
        live.wait()
    _trainer(tmp_path).train()  # the holder is gone: its lock is taken over
    assert any("taking over the lock of a run that is gone" in r.getMessage() for r in caplog.records)
    assert not (run / run_dir.LOCK_FILE).exists()  # released at the end
