"""The built-in demo: plain OPD against FiRe-OPD from the same weak student, on this machine.

    fire-opd demo [--setting single|multi-teacher] [--steps N] [--seed S] [--out runs/demo]

Loads the shipped tokenizer, teacher(s) and student initialization (fire_opd/assets, made by
`python -m fire_opd.build_assets`), trains the same student with `method="opd"` and with
`method="fire"` for the same steps and seed, evaluates teacher(s), the initial student and
both results on held-out problems, prints a table and saves `demo.png` (accuracy, keep
ratio and weight statistics over steps) and `summary.json`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from .build_assets import ASSETS_DIR
from .config import TrainConfig
from .data import sample_problems
from .evaluate import accuracy, accuracy_by_teacher
from .models import load_causal_lm, load_tokenizer
from .trainer import FireOPDTrainer

SETTINGS = {
    "single": {"tasks": ["arith"], "teachers": {"arith": "teacher_arith"}},
    "multi-teacher": {"tasks": ["arith", "reverse"], "teachers": {"arith": "teacher_arith",
                                                                   "reverse": "teacher_reverse"}},
}

# The demo's training recipe (identical for both methods apart from `method`).
# Chosen by a small sweep on the single-teacher setting (lr 3e-5..6e-4, warmup 5..40, 80..300 steps,
# 16..64 prompts per step) for plain OPD; FiRe-OPD runs with exactly the same recipe.
DEMO_CONFIG = TrainConfig(
    steps=300, prompts_per_step=64, samples_per_prompt=4, micro_batch_size=256, max_new_tokens=8, lr=3e-4,
    warmup_steps=40, min_lr_ratio=0.1, eval_every=25, eval_size=400, percentile=20.0, progress=True,
    tensorboard=False, temperature=1.0,
)


def _check_assets(assets: Path, names) -> None:
    missing = [n for n in ["tokenizer", *names] if not (assets / n).is_dir()]
    if missing:
        raise FileNotFoundError(f"demo assets {missing} not found under {assets}; "
                                "rebuild them with `python -m fire_opd.build_assets`")


def run_demo(setting: str = "single", *, steps: Optional[int] = None, seed: int = 0, out_dir: str | Path = "runs/demo",
             assets: str | Path = ASSETS_DIR, eval_size: Optional[int] = None, plot: bool = True,
             progress: bool = True) -> dict:
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {setting!r}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    assets, out_dir = Path(assets), Path(out_dir)
    spec = SETTINGS[setting]
    _check_assets(assets, [*spec["teachers"].values(), "student_init"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(assets / "tokenizer")
    teachers = {key: load_causal_lm(assets / name) for key, name in spec["teachers"].items()}
    base = replace(DEMO_CONFIG, seed=seed, progress=progress and sys.stderr.isatty(), steps=steps or DEMO_CONFIG.steps,
                   eval_size=eval_size or DEMO_CONFIG.eval_size)
    train = sample_problems(spec["tasks"], 4000, seed=1000 + seed, held_out=False)
    held_out = sample_problems(spec["tasks"], base.eval_size, seed=2000 + seed, held_out=True)

    rows = []
    for key, teacher in teachers.items():
        own = [p for p in held_out if p.teacher == key]
        column = "all" if len(teachers) == 1 else key  # its own task's column
        rows.append({"model": f"teacher {key}", "accuracy": {column: accuracy(teacher, tokenizer, own)}})
    initial = load_causal_lm(assets / "student_init")
    initial_accuracy = accuracy_by_teacher(initial, tokenizer, held_out)
    rows.append({"model": "student (initial)", "accuracy": initial_accuracy})

    curves = {}
    for method in ("opd", "fire"):
        config = replace(base, method=method, output_dir=str(out_dir / method))
        trainer = FireOPDTrainer(config, student=load_causal_lm(assets / "student_init"), teachers=teachers,
                                 tokenizer=tokenizer, train_problems=train, eval_problems=held_out)
        t0 = time.perf_counter()
        history = trainer.train()
        seconds = time.perf_counter() - t0
        tokens = sum(h["train/response_length"] * config.rollouts_per_step for h in history)
        curves[method] = history
        rows.append({"model": f"student + {'FiRe-OPD' if method == 'fire' else 'OPD'}",
                     "accuracy": accuracy_by_teacher(trainer.student, tokenizer, held_out),
                     "steps": config.steps, "tokens_per_s": tokens / seconds, "seconds": seconds})

    summary = {"setting": setting, "seed": seed, "steps": base.steps, "eval_problems": len(held_out),
               "rows": rows, "config": {k: v for k, v in base.to_dict().items() if k not in ("teachers",)}}
    (out_dir / "summary.json").write_text(json.dumps({**summary, "curves": curves}, indent=1))
    print(format_table(summary))
    if plot:
        path = plot_curves(curves, out_dir / "demo.png", title=f"FiRe-OPD demo ({setting}, seed {seed})",
                           initial_accuracy=initial_accuracy["all"])
        print(f"plot: {path}")
    return summary


def format_table(summary: dict) -> str:
    keys = sorted({k for row in summary["rows"] for k in row["accuracy"]}, key=lambda k: (k != "all", k))
    head = "| model | " + " | ".join("accuracy" if k == "all" else f"accuracy ({k})" for k in keys) + \
        " | steps | tokens/s |"
    lines = [f"setting {summary['setting']}, seed {summary['seed']}, {summary['eval_problems']} held-out problems",
             head, "|" + "---|" * (len(keys) + 3)]
    for row in summary["rows"]:
        cells = [f"{row['accuracy'][k]:.3f}" if k in row["accuracy"] else "" for k in keys]
        steps = str(row.get("steps", ""))
        tps = f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else ""
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {steps} | {tps} |")
    return "\n".join(lines)


def plot_curves(curves: dict, path: Path, title: str, initial_accuracy: Optional[float] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = {"opd": "OPD", "fire": "FiRe-OPD"}
    for method, history in curves.items():
        evals = [(0, initial_accuracy)] if initial_accuracy is not None else []
        evals += [(h["train/step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h]
        if evals:
            axes[0].plot(*zip(*evals), marker="o", label=names[method])
    axes[0].set(title="held-out accuracy", xlabel="step", ylabel="accuracy")
    fire = curves.get("fire", [])
    steps = [h["train/step"] for h in fire]
    axes[1].plot(steps, [h["fire/keep_ratio"] for h in fire], label="rollout keep ratio")
    axes[1].plot(steps, [h["train/reward"] for h in fire], label="train reward (FiRe)", alpha=0.6)
    axes[1].plot([h["train/step"] for h in curves.get("opd", [])], [h["train/reward"] for h in curves.get("opd", [])],
                 label="train reward (OPD)", alpha=0.6)
    axes[1].set(title="FiRe filter and rewards", xlabel="step", ylim=(0, 1.05))
    for key, style in (("fire/weight_mean", "-"), ("fire/weight_min", "--"), ("fire/weight_max", "--")):
        axes[2].plot(steps, [h[key] for h in fire], style, label=key.split("/")[1])
    axes[2].set(title="FiRe token weights (kept tokens)", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
