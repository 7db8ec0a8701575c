"""LoRA students in the CLI trainer (peft): only the adapters train and are checkpointed, a run
resumes bit-exactly from its adapters, final/ loads with AutoPeftModelForCausalLM, merge_lora
writes a plain model folder, and DDP trains the same adapters as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
from fire_opd.train.config import TrainConfig
from fire_opd.train.data import write_prompts
from fire_opd.train.trainer import FireOPDTrainer

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "fire_opd" / "demo" / "assets"
TOKENIZER = build_char_tokenizer(TASK_ALPHABET)
LORA = {"lora.r": 4, "lora.alpha": 8.0, "lora.target_modules": ["q_proj", "v_proj", "down_proj"]}


def _model(seed: int, path: Path | None = None):
    ids = dict(pad_id=TOKENIZER.pad_token_id, eos_id=TOKENIZER.eos_token_id)
    model = tiny_llama(len(TOKENIZER), 32, 2, 2, seed=seed, **ids)
    if path is not None:  # a folder, so that the adapters name their base model
        model.save_pretrained(str(path))
        TOKENIZER.save_pretrained(str(path))
    return model


def _trainer(tmp_path: Path, **values) -> FireOPDTrainer:
    student_dir = tmp_path / "student"
    if not student_dir.is_dir():
        _model(0, student_dir)
    base = {
        "output_dir": str(tmp_path / "run"), "optim.steps": 3, "optim.lr": 3e-3, "sampling.prompts_per_step": 2,
        "sampling.samples_per_prompt": 2, "sampling.max_new_tokens": 4, "checkpoint.save_every": 1,
        "logging.progress": False, "logging.report_to": [], "eval.every": 0, "models.student": str(student_dir),
        **LORA,
    }  # fmt: skip
    return FireOPDTrainer(
        TrainConfig.from_dict({**base, **values}), teachers={"arith": _model(1)}, tokenizer=TOKENIZER,
        train_problems=sample_problems(["arith"], 16, seed=1, split="train"),
    )  # fmt: skip


def test_only_the_adapters_train_and_are_checkpointed(tmp_path):
    trainer = _trainer(tmp_path, **{"lora.merge_lora": True})
    base_before = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in trainer.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in trainer.student.parameters() if p.requires_grad
    }
    adapters_before = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.student.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base_before.items())  # the base never moves
    assert any(not torch.equal(after[n], v) for n, v in adapters_before.items() if "lora_B" in n)
    final = tmp_path / "run" / "final"
    saved = load_file(str(final / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # adapters only
    assert not (final / "model.safetensors").exists()
    assert sum(t.numel() for t in saved.values()) == sum(after[n].numel() for n in trainable)
    # final/ loads with peft on the student it was trained from, and gives the trained model's logits
    ids = torch.tensor([[3, 4, 5, 6]])
    trainer.student.eval()
    expected = trainer.student(input_ids=ids).logits
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    # merge_lora: a plain model folder, no peft needed
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final-merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    assert trainer.summary()["merged_model"].endswith("final-merged")
    # the CLI's loader merges an adapter folder for `fire-opd eval --model RUN_DIR`
    from fire_opd.train.models import load_causal_lm

    assert torch.allclose(load_causal_lm(final).eval()(input_ids=ids).logits, expected, atol=1e-5)


def test_a_lora_run_resumes_exactly_from_its_adapters(tmp_path):
    whole = _trainer(tmp_path / "a")
    whole.train()
    _trainer(tmp_path / "b").train(until_step=2)
    resumed = _trainer(tmp_path / "b", **{"checkpoint.resume_from": "latest"})
    assert resumed.step == 2
    resumed.train()
    a = load_file(str(tmp_path / "a" / "run" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a full checkpoint does not fit a LoRA student (and the other way round): one line
    from fire_opd.errors import UsageError

    _trainer(tmp_path / "c", **{"lora.r": 0}).train(until_step=1)
    with pytest.raises(UsageError, match="lora.r: 0 -> 4"):
        _trainer(tmp_path / "c", **{"checkpoint.resume_from": "latest"})


def test_lora_settings_are_checked_before_models_load(tmp_path, capsys, monkeypatch):
    from fire_opd.cli import main as cli
    from fire_opd.train import models

    monkeypatch.chdir(tmp_path)
    write_prompts(sample_problems(["arith"], 8, seed=0, split="train"), tmp_path / "p.jsonl")
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    base = ["train", "--student", str(ASSETS / "student_init"), "--teacher", str(ASSETS / "teacher_arith"),
            "--prompts", "p.jsonl", "--output-dir", "run", "--set", "lora.r=4"]  # fmt: skip
    for extra, message in [
        (["--set", "lora.target_modules=[q_proj, w_nothere]"], "lora.target_modules: no module of the student"),
        (["--set", "lora.target_modules=[lm_head]"], "lora.target_modules: not lm_head"),
        (["--set", "parallel.student=fsdp"], "lora.r > 0 needs parallel.student: ddp"),
    ]:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_ddp_trains_the_same_adapters_as_one_process(tmp_path):
    write_prompts(sample_problems(["arith"], 32, seed=0, split="train"), tmp_path / "p.jsonl")
    config = {
        "models": {"student": str(ASSETS / "student_init"), "teachers": {"arith": str(ASSETS / "teacher_arith")},
                   "tokenizer": str(ASSETS / "tokenizer")},
        "lora": {"r": 4, "alpha": 8.0, "target_modules": "all-linear"},
        "data": {"prompts": "p.jsonl"},
        "sampling": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8},
        "optim": {"steps": 2, "lr": 1e-3, "micro_batch_size": 4},
        "eval": {"every": 0}, "logging": {"progress": False, "report_to": []}, "runtime": {"threads": 1},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    runs = {}
    for processes in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        out = subprocess.run(
            [*launcher, "-m", "fire_opd", "train", "--config", "cfg.yaml", "--output-dir", f"run{processes}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        runs[processes] = load_file(str(tmp_path / f"run{processes}" / "final" / "adapter_model.safetensors"))
        summary = json.loads((tmp_path / f"run{processes}" / "summary.json").read_text())
        assert summary["steps"] == 2
    for name, value in runs[1].items():
        assert torch.allclose(value, runs[2][name], rtol=1e-4, atol=1e-6), name
