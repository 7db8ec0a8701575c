"""The built-in demo: plain OPD against FiRe-OPD from the same student, on this machine.

    fire-opd demo [--setting chain|single|multi-teacher] [--steps N] [--seed S] [--out runs/demo]

Settings (assets under fire_opd/assets, made by `python -m fire_opd.build_assets`):
  chain          (default) the paper's regime: teacher and a smaller student of one family (the
                 student learned from the teacher's own samples), 31-token worked solutions, a
                 teacher with real entropy (three valid solution formats), one rollout per prompt.
  single         two-step arithmetic; teacher and student trained apart, near-deterministic
                 teacher, 7-token answers, 4 rollouts per prompt (the first demo).
  multi-teacher  arithmetic and digit reversal, each rollout routed to its own teacher.

Trains the same student with `method="opd"` and `method="fire"` for the same steps and seed,
evaluates teacher(s), the initial student and both results on held-out problems, prints a
table and the regime statistics, and saves `demo.png` and `summary.json`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from .build_assets import ASSETS_DIR
from .config import TrainConfig
from .data import Problem, sample_problems
from .evaluate import accuracy, accuracy_by_teacher
from .models import load_causal_lm, load_tokenizer
from .regime import measure_regime
from .trainer import FireOPDTrainer


@dataclass(frozen=True)
class DemoSetting:
    """One built-in distillation setting: tasks, asset folders and its training recipe."""

    tasks: tuple[str, ...]
    teachers: dict  # routing key -> teacher folder under the assets directory
    student: str  # initial student folder
    tokenizer: str
    recipe: TrainConfig  # identical for every method and objective in the setting


# Recipes. Each was chosen on the setting's validation split (never on held-out problems) by the
# learning-rate sweep that `fire-opd study --select` runs for plain OPD (benchmarks/results/study/),
# and is used unchanged for every method. `threads` is fixed so that a seed reproduces its numbers.
SINGLE_RECIPE = TrainConfig(
    steps=150, prompts_per_step=32, samples_per_prompt=4, micro_batch_size=128, max_new_tokens=8, lr=3e-4,
    warmup_steps=20, min_lr_ratio=0.1, eval_every=50, eval_size=400, percentile=20.0, tensorboard=False,
    overwrite=True,  # a demo run replaces the previous one in its folder
)
# chain's 40-token limit sits below its longest solutions (up to 46 tokens, "steps" format with
# negative numbers), so about 3.5% of the initial student's rollouts run to the limit without EOS, as
# long reasoning does under the paper's 16k budget.
CHAIN_RECIPE = TrainConfig(
    steps=100, prompts_per_step=64, samples_per_prompt=1, micro_batch_size=64, max_new_tokens=40, lr=3e-4,
    warmup_steps=10, min_lr_ratio=0.1, eval_every=50, eval_size=400, percentile=20.0, tensorboard=False,
    overwrite=True,
)

# Learning rate per setting and objective, chosen by `fire-opd study --select` (plain OPD, validation
# split); "trl_distillation" is TRL's DistillationTrainer's, chosen the same way.
RECIPE_LR = {
    "chain": {"sampled": 3e-4, "full_vocab": 3e-4, "trl_distillation": 1e-4},
    "single": {"sampled": 1e-4, "full_vocab": 3e-4, "trl_distillation": 1e-3},
    "multi-teacher": {"sampled": 1e-4, "full_vocab": 3e-4, "trl_distillation": 1e-3},  # single's (not swept)
}

SETTINGS = {
    "chain": DemoSetting(("chain",), {"chain": "chain/teacher"}, "chain/student_init", "chain/tokenizer",
                         CHAIN_RECIPE),
    "single": DemoSetting(("arith",), {"arith": "teacher_arith"}, "student_init", "tokenizer", SINGLE_RECIPE),
    "multi-teacher": DemoSetting(("arith", "reverse"), {"arith": "teacher_arith", "reverse": "teacher_reverse"},
                                 "student_init", "tokenizer", SINGLE_RECIPE),
}
DEFAULT_SETTING = "chain"
METHOD_NAMES = {"opd": "OPD", "fire": "FiRe-OPD"}
REGIME_ROLLOUTS = 256


def row_name(method: str) -> str:
    return f"student + {METHOD_NAMES.get(method, method)}"


def get_setting(name: str) -> DemoSetting:
    if name not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {name!r}")
    return SETTINGS[name]


def load_setting(name: str, assets: str | Path = ASSETS_DIR):
    """(setting, tokenizer, teachers) with a clear error when the assets are missing."""
    setting, assets = get_setting(name), Path(assets)
    missing = [f for f in (setting.tokenizer, setting.student, *setting.teachers.values()) if not (assets / f).is_dir()]
    if missing:
        raise FileNotFoundError(f"demo assets {missing} not found under {assets}; "
                                "rebuild them with `python -m fire_opd.build_assets`")
    tokenizer = load_tokenizer(assets / setting.tokenizer)
    teachers = {key: load_causal_lm(assets / folder) for key, folder in setting.teachers.items()}
    return setting, tokenizer, teachers


def problem_sets(setting: DemoSetting, seed: int, eval_size: int, eval_split: str = "test"):
    """Training prompts and evaluation problems (held-out "test", or "validation" for recipes)."""
    train = sample_problems(setting.tasks, 4000, seed=1000 + seed, split="train")
    evaluation = sample_problems(setting.tasks, eval_size, seed=2000 + seed, split=eval_split)
    return train, evaluation


def train_student(name: str, config: TrainConfig, *, assets: str | Path = ASSETS_DIR, loaded=None,
                  problems: Optional[tuple[list[Problem], list[Problem]]] = None) -> dict:
    """Train the setting's initial student with `config`; returns the trainer, history and time."""
    setting, tokenizer, teachers = loaded or load_setting(name, assets)
    train, evaluation = problems or problem_sets(setting, config.seed, config.eval_size)
    trainer = FireOPDTrainer(config, student=load_causal_lm(Path(assets) / setting.student), teachers=teachers,
                             tokenizer=tokenizer, train_problems=train, eval_problems=evaluation)
    t0 = time.perf_counter()
    history = trainer.train()
    return {"trainer": trainer, "history": history, "seconds": time.perf_counter() - t0}


def run_demo(setting: str = DEFAULT_SETTING, *, steps: Optional[int] = None, seed: int = 0,
             out_dir: str | Path = "runs/demo", assets: str | Path = ASSETS_DIR, eval_size: Optional[int] = None,
             methods: tuple[str, ...] = ("opd", "fire"), objective: Optional[str] = None, plot: bool = True,
             progress: bool = True) -> dict:
    spec, tokenizer, teachers = load_setting(setting, assets)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objective = objective or spec.recipe.objective
    base = replace(spec.recipe, seed=seed, progress=progress and sys.stderr.isatty(), steps=steps or spec.recipe.steps,
                   eval_size=eval_size or spec.recipe.eval_size, objective=objective, lr=RECIPE_LR[setting][objective])
    train, held_out = problem_sets(spec, seed, base.eval_size)
    max_new = base.max_new_tokens

    rows = []
    for key, teacher in teachers.items():
        own = [p for p in held_out if p.teacher == key]
        column = "all" if len(teachers) == 1 else key  # its own task's column
        rows.append({"model": f"teacher {key}", "accuracy": {column: accuracy(teacher, tokenizer, own,
                                                                              max_new_tokens=max_new)}})
    initial = FireOPDTrainer(replace(base, output_dir=str(out_dir / "initial")),
                             student=load_causal_lm(Path(assets) / spec.student), teachers=teachers,
                             tokenizer=tokenizer, train_problems=train)
    initial_accuracy = accuracy_by_teacher(initial.student, tokenizer, held_out, max_new_tokens=max_new)
    rows.append({"model": "student (initial)", "accuracy": initial_accuracy})
    regime = measure_regime(initial, train[:REGIME_ROLLOUTS], seed=seed)

    curves = {}
    for method in methods:
        config = replace(base, method=method, output_dir=str(out_dir / method))
        run = train_student(setting, config, assets=assets, loaded=(spec, tokenizer, teachers),
                            problems=(train, held_out))
        history, seconds = run["history"], run["seconds"]
        tokens = sum(h["train/response_length"] * config.rollouts_per_step for h in history)
        curves[method] = history
        rows.append({"model": row_name(method), "method": method,
                     "accuracy": accuracy_by_teacher(run["trainer"].student, tokenizer, held_out,
                                                     max_new_tokens=max_new),
                     "steps": config.steps, "tokens_per_s": tokens / seconds, "seconds": seconds})

    summary = {"setting": setting, "seed": seed, "steps": base.steps, "objective": base.objective,
               "eval_problems": len(held_out), "rows": rows, "regime": regime,
               "config": {k: v for k, v in base.to_dict().items() if k not in ("teachers",)}}
    (out_dir / "summary.json").write_text(json.dumps({**summary, "curves": curves}, indent=1))
    print(format_table(summary))
    print(format_regime(regime))
    if plot:
        path = plot_curves(curves, out_dir / "demo.png", title=f"FiRe-OPD demo ({setting}, seed {seed}, "
                           f"objective {base.objective})", initial_accuracy=initial_accuracy["all"])
        print(f"plot: {path}")
    return summary


def format_table(summary: dict) -> str:
    keys = sorted({k for row in summary["rows"] for k in row["accuracy"]}, key=lambda k: (k != "all", k))
    head = "| model | " + " | ".join("accuracy" if k == "all" else f"accuracy ({k})" for k in keys) + \
        " | steps | tokens/s |"
    lines = [f"setting {summary['setting']}, seed {summary['seed']}, objective {summary.get('objective', 'sampled')}, "
             f"{summary['eval_problems']} held-out problems", head, "|" + "---|" * (len(keys) + 3)]
    for row in summary["rows"]:
        cells = [f"{row['accuracy'][k]:.3f}" if k in row["accuracy"] else "" for k in keys]
        steps = str(row.get("steps", ""))
        tps = f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else ""
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {steps} | {tps} |")
    return "\n".join(lines)


def format_regime(regime: dict) -> str:
    return (f"regime (initial student, {regime['rollouts']} rollouts): "
            f"reverse KL {regime['initial_reverse_kl_per_token']:.3f} nats/token, "
            f"{regime['mean_response_tokens']:.1f} response tokens, "
            f"degenerate {regime['degenerate_rollout_fraction']:.3f} "
            f"(truncated {regime['truncated_rollout_fraction']:.3f}, looping {regime['looping_rollout_fraction']:.3f}, "
            f"malformed {regime['malformed_rollout_fraction']:.3f}), "
            f"teacher entropy {regime['teacher_entropy_mean']:.3f} nats/token")


def plot_curves(curves: dict, path: Path, title: str, initial_accuracy: Optional[float] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, history in curves.items():
        evals = [(0, initial_accuracy)] if initial_accuracy is not None else []
        evals += [(h["train/step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h]
        if evals:
            axes[0].plot(*zip(*evals), marker="o", label=METHOD_NAMES.get(method, method))
        steps = [h["train/step"] for h in history]
        axes[1].plot(steps, [h["train/reward"] for h in history], alpha=0.7,
                     label=f"train reward ({METHOD_NAMES.get(method, method)})")
    axes[0].set(title="held-out accuracy", xlabel="step", ylabel="accuracy")
    fire = curves.get("fire", [])
    steps = [h["train/step"] for h in fire]
    if fire:
        axes[1].plot(steps, [h["fire/keep_ratio"] for h in fire], label="rollout keep ratio (FiRe)")
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
