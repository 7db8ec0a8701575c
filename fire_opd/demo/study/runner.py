"""One study job in this process: train (fire-opd's trainer, or TRL's DistillationTrainer for the
baseline row) and evaluate on the held-out split; returns the job's result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from fire_opd.demo.recipes import EVAL_SAMPLES
from fire_opd.demo.study.grid import job_config

CURVE_KEYS = (
    "train/reward",
    "train/response_length",
    "train/full_vocab_reverse_kl",
    "fire/keep_ratio",
    "train/degenerate_fraction",
    "train/truncated_fraction",
)


# the selection rules' own per-step metrics, kept with the filter diagnostics (mean over steps)
RULE_METRICS = (
    "fire/token_keep_ratio",
    "fire/truncated_ratio",
    "fire/verified_rollouts",
    "fire/verified_reliable_ratio",
    "fire/verify_tokens",
    "time/verify_s",
)


def run_job(job: dict) -> dict:
    """One study job, in its own process: "initial" (teacher and initial student metrics, the
    regime statistics and the teacher's accuracy from student prefixes) or "train" / "trl" (one
    training run). Greedy accuracy and the sampled metrics on the same problems."""
    import torch

    from fire_opd.demo.regime import continuation_accuracy, measure_regime, step_accuracy_after_error
    from fire_opd.demo.run import REGIME_ROLLOUTS, evaluate_row, load_setting, problem_sets, train_student
    from fire_opd.train.health import ANSWER_FORMATS
    from fire_opd.train.models import load_causal_lm
    from fire_opd.train.trainer import FireOPDTrainer

    torch.set_num_threads(1)
    quick = job.get("quick", False)
    config = job_config(job, quick)
    loaded = load_setting(job["setting"])
    setting, tokenizer, teachers = loaded
    train, evaluation = problem_sets(setting, job["seed"], config.eval.size, eval_split=job["split"])

    def metrics(model, problems) -> dict:  # config.seed is the job's
        return evaluate_row(model, tokenizer, problems, config, EVAL_SAMPLES)

    t0 = time.perf_counter()
    if job["kind"] == "initial":
        trainer = FireOPDTrainer(
            config,
            student=load_causal_lm(assets_dir() / setting.student),
            teachers=teachers,
            tokenizer=tokenizer,
            train_problems=train,
            answer_formats=ANSWER_FORMATS,
        )
        initial = metrics(trainer.student, evaluation)
        teacher = {k: metrics(t, [p for p in evaluation if p.teacher == k]) for k, t in teachers.items()}
        result = {
            "initial_accuracy": initial["accuracy"]["all"],
            "initial_sampled": initial["sampled"]["all"],
            "teacher_accuracy": {k: m["accuracy"]["all"] for k, m in teacher.items()},
            "teacher_sampled": {k: m["sampled"]["all"] for k, m in teacher.items()},
            "regime": measure_regime(trainer, train[: 8 if quick else REGIME_ROLLOUTS], seed=job["seed"]),
        }
        # how reliable the teacher is off its own distribution (single-teacher settings)
        probe = dict(
            max_new_tokens=config.sampling.max_new_tokens, temperature=config.sampling.temperature, seed=job["seed"]
        )
        if len(teachers) == 1:
            only = next(iter(teachers.values()))
            result["teacher_reliability"] = continuation_accuracy(only, trainer.student, tokenizer, evaluation, **probe)
            if setting.tasks == ("chain",) and job["setting"] != "chain":  # the steps format's settings
                result["teacher_after_error"] = step_accuracy_after_error(
                    only, trainer.student, tokenizer, evaluation, **probe
                )
        trainer.close()
    elif job["kind"] == "trl":
        student = train_with_trl(config, loaded, train)
        final = metrics(student, evaluation)
        result = {
            "accuracy": final["accuracy"]["all"],
            "sampled": final["sampled"]["all"],
            "eval_curve": [(config.optim.steps, final["accuracy"]["all"])],
            "train_curves": {},
        }
    else:
        run = train_student(job["setting"], config, loaded=loaded, problems=(train, evaluation))
        history = run["history"]
        final = metrics(run["trainer"].student, evaluation)
        diag_keys = sorted({k for h in history for k in h if k.startswith("diag/") or k in RULE_METRICS})
        result = {
            "accuracy": final["accuracy"]["all"],
            "sampled": final["sampled"]["all"],
            "diagnostics": {k: nanmean([h.get(k, float("nan")) for h in history]) for k in diag_keys},
            "eval_curve": [(h["train/step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h],
            "train_curves": {key: [h.get(key) for h in history] for key in CURVE_KEYS},
        }
    return {
        **job,
        **result,
        "lr": config.optim.lr,
        "steps": config.optim.steps,
        "eval_samples": EVAL_SAMPLES,
        "seconds": time.perf_counter() - t0,
    }


def train_with_trl(config, loaded, train: list) -> "torch.nn.Module":
    """Train the setting's initial student with TRL's DistillationTrainer under `config`'s budget:
    `rollouts_per_step` on-policy completions per step (prompts drawn from the same training
    problems), `steps` steps, warmup + cosine to `min_lr_ratio`, the same clipping, temperature and
    token limit. Single-teacher settings only (TRL's trainer takes one teacher)."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from fire_opd.train.models import load_causal_lm

    setting, tokenizer, teachers = loaded
    if len(teachers) != 1:
        raise ValueError("TRL's DistillationTrainer takes one teacher; pick a single-teacher setting")
    (teacher,) = teachers.values()
    tokenizer.padding_side = "left"
    dataset = Dataset.from_list([{"prompt": p.prompt} for p in train])
    args = DistillationConfig(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.sampling.rollouts_per_step,
        gradient_accumulation_steps=1,
        max_steps=config.optim.steps,
        learning_rate=config.optim.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": config.optim.min_lr_ratio},
        warmup_steps=config.optim.warmup_steps,
        max_grad_norm=config.optim.max_grad_norm,
        weight_decay=config.optim.weight_decay,
        adam_beta1=config.optim.adam_betas[0],
        adam_beta2=config.optim.adam_betas[1],
        max_completion_length=config.sampling.max_new_tokens,
        temperature=config.sampling.temperature,
        top_p=config.sampling.top_p,
        top_k=0,
        beta=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        logging_steps=max(config.optim.steps // 10, 1),
        seed=config.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    student = load_causal_lm(assets_dir() / setting.student)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    assert trainer.model is not None
    return trainer.model.eval()


def nanmean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def assets_dir() -> Path:
    from fire_opd.demo.build_assets import ASSETS_DIR

    return ASSETS_DIR
