"""The README's and the training page's `distill.yaml` train as written.

Hub ids cannot be downloaded here, so the models become the shipped tiny student and teacher,
the data a local dataset with the same columns and splits, and the run is cut to two small
steps; every other field (bf16 full fine-tuning or LoRA, chat rows, the verifier, report_to
with W&B offline, gradient checkpointing, checkpoints) stays as the page writes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from fire_opd.demo.tasks import sample_problems
from fire_opd.train.config import TrainConfig, flatten_keys
from fire_opd.train.trainer import FireOPDTrainer

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "fire_opd" / "demo" / "assets"
SMALL = {
    "sampling.prompts_per_step": 2, "sampling.samples_per_prompt": 2, "sampling.max_new_tokens": 8,
    "optim.steps": 2, "optim.micro_batch_size": 4, "optim.warmup_steps": 0, "eval.every": 2, "eval.size": 4,
    "checkpoint.save_every": 1, "logging.progress": False,
}  # fmt: skip


def _blocks(page: str) -> list[dict]:
    text = (ROOT / page).read_text()
    return [
        yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if b.startswith("# distill.yaml")
    ]


def _local_data(folder: Path, values: dict) -> dict:
    """A save_to_disk dataset with the page's columns and splits; the data fields pointing at it."""
    import datasets

    prompt, answer = values.get("data.prompt_field", "prompt"), values.get("data.answer_field", "answer")
    chat = values.get("data.messages_field", "messages")

    def rows(split: str, n: int) -> list[dict]:
        problems = sample_problems(["arith"], n, seed=0 if split == "train" else 1, split=split)
        if values.get("data.chat_template_kwargs"):  # the page's rows are chat messages
            return [{chat: [{"role": "user", "content": p.prompt}], answer: p.answer} for p in problems]
        return [{prompt: p.prompt, answer: p.answer} for p in problems]

    train_split = values.get("data.prompts_split", "train")
    eval_split = values.get("data.eval_prompts_split", "test")
    splits = {train_split: rows("train", 16), eval_split: rows("test", 8)}
    path = folder / "data"
    datasets.DatasetDict({name: datasets.Dataset.from_list(r) for name, r in splits.items()}).save_to_disk(str(path))
    return {
        "data.prompts": str(path), "data.prompts_split": train_split,
        "data.eval_prompts": str(path), "data.eval_prompts_split": eval_split,
    }  # fmt: skip


@pytest.mark.parametrize("page", ["README.md", "docs/training.md"])
def test_the_documented_yaml_trains_as_written(page, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for index, block in enumerate(_blocks(page)):
        values, _ = flatten_keys(block)
        values.update(SMALL)
        values.update(_local_data(tmp_path / f"b{index}", values))
        values.update({
            "models.student": str(ASSETS / "student_init"), "models.tokenizer": str(ASSETS / "tokenizer"),
            "models.teachers": {name: str(ASSETS / "teacher_arith") for name in values["models.teachers"]},
            "output_dir": str(tmp_path / f"run{index}"),
        })  # fmt: skip
        if values.get("data.verifier") not in (None, "final_answer", "last_number", "boxed"):
            values["data.verifier"] = "last_number"  # the page's own module is the user's
        config = TrainConfig.from_dict(values)
        trainer = FireOPDTrainer(config)
        before = {n: p.detach().float().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
        history = trainer.train()
        assert len(history) == 2 and all(row["train/step_skipped"] == 0.0 for row in history)
        assert (tmp_path / f"run{index}" / "final").is_dir()
        moved = total = 0
        for name, p in trainer.student.named_parameters():
            if name in before:
                trained = trainer.optimizer.state.get(p, {}).get("master", p).detach().float()
                moved += int((trained != before[name]).sum())
                total += p.numel()
        assert moved > 0.5 * total, f"{page}: {moved} of {total} trained weights moved"
        if config.models.dtype == "bfloat16" and not config.lora.enabled:
            assert {p.dtype for p in trainer.student.parameters()} == {torch.bfloat16}
        if "wandb" in config.logging.report_to:
            assert any((tmp_path / f"run{index}" / "wandb").iterdir())
        summary = json.loads((tmp_path / f"run{index}" / "summary.json").read_text())
        assert summary["steps"] == 2
