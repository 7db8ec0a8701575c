"""The built-in demo: plain OPD against FiRe-OPD from the same student, on this machine.

    fire-opd demo [--setting steps|brittle-teacher|error-cascade|chain|single|multi-teacher] [--steps N] [--seed S]
                  [--variants opd fire ...] [--samples K] [--out runs/demo]

Settings (assets under fire_opd/demo/assets, made by `python -m fire_opd.demo.build_assets`):
  steps            (default) the paper's regime, well posed: one family, one solution format
                   (six-term chains solved one binary operation at a time, 36 tokens on average),
                   a smaller student trained briefly on the teacher's own samples, one rollout per
                   prompt. Distillation closes much of the gap here.
  brittle-teacher  FiRe's premise built to hold: the steps teacher additionally taught to continue
                   a "rewrite" solution (which it never starts itself) confidently wrong, and a
                   student that writes half of its solutions as rewrites.
  error-cascade    a teacher unreliable after the student's mistake: the steps teacher additionally
                   taught to continue a chain confidently wrong after a running value restated
                   wrongly, and steps' student, whose copy errors anywhere in a chain lead there.
  chain            the documented failure case: a teacher with three valid formats; distillation
                   moves the student's format choice onto the one it executes worst.
  single           two-step arithmetic; teacher and student trained apart, near-deterministic
                   teacher, 7-token answers, 4 rollouts per prompt (the first demo).
  multi-teacher    arithmetic and digit reversal, each rollout routed to its own teacher.

Trains the same student with each of DEMO_VARIANTS (plain OPD, FiRe-OPD, and the selection rule
the study recommends; `--variants` picks others) for the same steps and seed,
evaluates teacher(s), the initial student and both results on held-out problems, greedy
accuracy beside the sampled avg@K and pass@K (K completions per problem at the training
temperature, top-p 1, as the field reports on-policy distillation), prints a table and the
regime statistics, and saves `demo.png` and `summary.json`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from fire_opd.demo.build_assets import ASSETS_DIR
from fire_opd.demo.recipes import DEFAULT_SETTING, DEMO_VARIANTS, EVAL_SAMPLES, RECIPE_LR, SETTINGS, DemoSetting
from fire_opd.demo.regime import measure_regime
from fire_opd.demo.study.grid import VARIANT_LABELS, VARIANTS, variant_overrides
from fire_opd.demo.tasks import sample_problems
from fire_opd.train.config import TrainConfig
from fire_opd.train.data import Problem
from fire_opd.train.evaluate import greedy_and_sampled
from fire_opd.train.health import ANSWER_FORMATS
from fire_opd.train.models import load_causal_lm, load_tokenizer
from fire_opd.train.trainer import FireOPDTrainer

REGIME_ROLLOUTS = 256


def label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def row_name(variant: str) -> str:
    return f"student + {label(variant)}"


def recipe_lr(setting: str, objective: str) -> float:
    """The learning rate chosen on `setting`'s validation split for `objective` (or "trl_distillation")."""
    chosen = RECIPE_LR[setting]
    if objective not in chosen:
        raise ValueError(
            f"objective {objective!r} has no learning rate chosen on the {setting} setting's validation "
            f"split (it has {sorted(chosen)}); run `fire-opd study --select --settings {setting} "
            f"--objectives {objective}` and add it to fire_opd/demo/recipes.py"
        )
    return chosen[objective]


def get_setting(name: str) -> DemoSetting:
    if name not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {name!r}")
    return SETTINGS[name]


def load_setting(name: str, assets: str | Path = ASSETS_DIR):
    """(setting, tokenizer, teachers) with a clear error when the assets are missing."""
    setting, assets = get_setting(name), Path(assets)
    missing = [f for f in (setting.tokenizer, setting.student, *setting.teachers.values()) if not (assets / f).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"demo assets {missing} not found under {assets}; rebuild them with `python -m fire_opd.demo.build_assets`"
        )
    tokenizer = load_tokenizer(assets / setting.tokenizer)
    teachers = {key: load_causal_lm(assets / folder) for key, folder in setting.teachers.items()}
    return setting, tokenizer, teachers


def problem_sets(setting: DemoSetting, seed: int, eval_size: int, eval_split: str = "test"):
    """Training prompts and evaluation problems (held-out "test", or "validation" for recipes)."""
    train = sample_problems(setting.tasks, 4000, seed=1000 + seed, split="train")
    evaluation = sample_problems(setting.tasks, eval_size, seed=2000 + seed, split=eval_split)
    return train, evaluation


def train_student(
    name: str,
    config: TrainConfig,
    *,
    assets: str | Path = ASSETS_DIR,
    loaded=None,
    problems: Optional[tuple[list[Problem], list[Problem]]] = None,
) -> dict:
    """Train the setting's initial student with `config`; returns the trainer, history and time."""
    setting, tokenizer, teachers = loaded or load_setting(name, assets)
    train, evaluation = problems or problem_sets(setting, config.seed, config.eval.size)
    trainer = FireOPDTrainer(
        config,
        student=load_causal_lm(Path(assets) / setting.student),
        teachers=teachers,
        tokenizer=tokenizer,
        train_problems=train,
        eval_problems=evaluation,
        answer_formats=ANSWER_FORMATS,
    )
    t0 = time.perf_counter()
    history = trainer.train()
    return {"trainer": trainer, "history": history, "seconds": time.perf_counter() - t0}


def evaluate_row(model, tokenizer, problems: list[Problem], config: TrainConfig, samples: int) -> dict:
    """{"accuracy": greedy, "sampled": avg@K / pass@k} of one model, sampled at the recipe's
    temperature with a seed fixed by the run's (every row sees the same sampling seed)."""
    return greedy_and_sampled(
        model,
        tokenizer,
        problems,
        max_new_tokens=config.sampling.max_new_tokens,
        samples=samples,
        temperature=config.sampling.temperature,
        seed=config.seed,
    )


def run_demo(
    setting: str = DEFAULT_SETTING,
    *,
    steps: Optional[int] = None,
    seed: int = 0,
    out_dir: str | Path = "runs/demo",
    assets: str | Path = ASSETS_DIR,
    eval_size: Optional[int] = None,
    variants: tuple[str, ...] = DEMO_VARIANTS,
    objective: Optional[str] = None,
    plot: bool = True,
    progress: bool = True,
    samples: int = EVAL_SAMPLES,
) -> dict:
    """Train the setting's student once per variant (a name of the study's `VARIANTS`: a method
    and its options) from the same seed and recipe, evaluate every row on the same held-out
    problems, print the table and return the summary."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be names from {sorted(VARIANTS)}, got {list(variants)!r}")
    spec, tokenizer, teachers = load_setting(setting, assets)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objective = objective or spec.recipe.loss.objective
    base = spec.recipe.updated(
        {
            "seed": seed,
            "logging.progress": progress and sys.stderr.isatty(),
            "optim.steps": steps or spec.recipe.optim.steps,
            "eval.size": eval_size or spec.recipe.eval.size,
            "loss.objective": objective,
            "optim.lr": recipe_lr(setting, objective),
        }
    )
    train, held_out = problem_sets(spec, seed, base.eval.size)

    rows = []
    for key, teacher in teachers.items():
        own = [p for p in held_out if p.teacher == key]
        result = evaluate_row(teacher, tokenizer, own, base, samples)
        if len(teachers) > 1:  # its own task's column
            result = {name: {key: values["all"]} for name, values in result.items()}
        rows.append({"model": f"teacher {key}", **result})
    initial = FireOPDTrainer(
        base.updated({"output_dir": str(out_dir / "initial")}),
        student=load_causal_lm(Path(assets) / spec.student),
        teachers=teachers,
        tokenizer=tokenizer,
        train_problems=train,
        answer_formats=ANSWER_FORMATS,
    )
    initial_row = {"model": "student (initial)", **evaluate_row(initial.student, tokenizer, held_out, base, samples)}
    rows.append(initial_row)
    regime = measure_regime(initial, train[:REGIME_ROLLOUTS], seed=seed)
    initial.close()

    curves = {}
    for variant in variants:
        config = base.updated(
            {**variant_overrides(variant, setting, spec.recipe), "output_dir": str(out_dir / variant)}
        )
        run = train_student(
            setting, config, assets=assets, loaded=(spec, tokenizer, teachers), problems=(train, held_out)
        )
        history, seconds = run["history"], run["seconds"]
        tokens = sum(h["train/response_length"] * config.sampling.rollouts_per_step for h in history)
        curves[variant] = history
        rows.append(
            {
                "model": row_name(variant),
                "variant": variant,
                **evaluate_row(run["trainer"].student, tokenizer, held_out, base, samples),
                "steps": config.optim.steps,
                "tokens_per_s": tokens / seconds,
                "seconds": seconds,
            }
        )

    summary = {
        "setting": setting,
        "seed": seed,
        "steps": base.optim.steps,
        "objective": base.loss.objective,
        "eval_problems": len(held_out),
        "eval_samples": samples,
        "eval_temperature": base.sampling.temperature,
        "rows": rows,
        "regime": regime,
        "config": base.to_dict(),
    }
    (out_dir / "summary.json").write_text(json.dumps({**summary, "curves": curves}, indent=1))
    print(format_table(summary))
    print(format_regime(regime))
    if plot:
        path = plot_curves(
            curves,
            out_dir / "demo.png",
            title=f"FiRe-OPD demo ({setting}, seed {seed}, objective {base.loss.objective})",
            initial_accuracy=initial_row["accuracy"]["all"],
        )
        print(f"plot: {path}")
    return summary


def format_table(summary: dict) -> str:
    """Greedy accuracy and sampled avg@K per routing key, pass@K overall, steps and tokens/s."""
    keys = sorted({k for row in summary["rows"] for k in row["accuracy"]}, key=lambda k: (k != "all", k))
    samples = summary.get("eval_samples", EVAL_SAMPLES)
    avg, top = f"avg@{samples}", f"pass@{samples}"
    columns: list[tuple[str, str, str, Optional[str]]] = [
        (f"greedy{'' if k == 'all' else f' ({k})'}", "accuracy", k, None) for k in keys
    ]
    columns += [(f"{avg}{'' if k == 'all' else f' ({k})'}", "sampled", k, avg) for k in keys]
    columns.append((top, "sampled", "all", top))
    lines = [
        f"setting {summary['setting']}, seed {summary['seed']}, objective {summary.get('objective', 'sampled')}, "
        f"{summary['eval_problems']} held-out problems; greedy accuracy, and {avg} / {top} from {samples} "
        f"samples per problem at temperature {summary.get('eval_temperature', 1.0):g}",
        "| model | " + " | ".join(name for name, *_ in columns) + " | steps | tokens/s |",
        "|" + "---|" * (len(columns) + 3),
    ]
    for row in summary["rows"]:
        cells = []
        for _, field_name, key, metric in columns:
            value = row.get(field_name, {}).get(key)
            value = value.get(metric) if isinstance(value, dict) else value
            cells.append("" if value is None else f"{value:.3f}")
        steps = str(row.get("steps", ""))
        tps = f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else ""
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {steps} | {tps} |")
    return "\n".join(lines)


def format_regime(regime: dict) -> str:
    return (
        f"regime (initial student, {regime['rollouts']} rollouts): "
        f"reverse KL {regime['initial_reverse_kl_per_token']:.3f} nats/token, "
        f"{regime['mean_response_tokens']:.1f} response tokens, "
        f"degenerate {regime['degenerate_rollout_fraction']:.3f} "
        f"(truncated {regime['truncated_rollout_fraction']:.3f}, looping {regime['looping_rollout_fraction']:.3f}, "
        f"malformed {regime['malformed_rollout_fraction']:.3f}), "
        f"teacher entropy {regime['teacher_entropy_mean']:.3f} nats/token"
    )


def plot_curves(curves: dict, path: Path, title: str, initial_accuracy: Optional[float] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for variant, history in curves.items():
        evals = [(0, initial_accuracy)] if initial_accuracy is not None else []
        evals += [(h["train/step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h]
        if evals:
            axes[0].plot(*zip(*evals), marker="o", label=label(variant))
        steps = [h["train/step"] for h in history]
        axes[1].plot(steps, [h["train/reward"] for h in history], alpha=0.7, label=f"train reward ({label(variant)})")
        if variant != "fire" and history and "fire/token_keep_ratio" in history[0]:
            kept = [h["fire/token_keep_ratio"] for h in history]
            axes[1].plot(steps, kept, label=f"token keep ratio ({label(variant)})")
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
