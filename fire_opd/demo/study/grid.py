"""The study's grid: its variants (a method and its options each), the jobs of a study (setting x
objective x variant x seed) and each job's training config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fire_opd.demo.recipes import SELECT_LRS
from fire_opd.train.config import PRESETS, TrainConfig

OUT_DIR = Path("benchmarks/results/study")

# name -> TrainConfig overrides. fire at percentile 0 keeps every rollout, so it *is* reweight_only
# (bit for bit); the percentile sweep reports that row for p = 0. A callable gets (setting, recipe).
VARIANTS = {
    "opd": {"fire.method": "opd"},
    "fire": {"fire.method": "fire"},
    "filter_only": {"fire.method": "filter_only"},
    "reweight_only": {"fire.method": "reweight_only"},
    "hard_token": {"fire.method": "hard_token"},
    "fire_p10": {"fire.method": "fire", "fire.percentile": 10.0},
    "fire_p30": {"fire.method": "fire", "fire.percentile": 30.0},
    "fire_group": {"fire.method": "fire", "fire.filter_scope": "group"},
    # hypotheses beyond the paper (issue 7, item 5), each a named option of the loss; the gate's
    # 0.5 was fixed before any run, not tuned
    "opd_gate": {"fire.method": "opd", "fire.teacher_confidence_gate": 0.5},
    "fire_gate": {"fire.method": "fire", "fire.teacher_confidence_gate": 0.5},
    "fire_score_sum": {"fire.method": "fire", "fire.filter_score": "teacher_sum"},
    "fire_score_adv": {"fire.method": "fire", "fire.filter_score": "advantage_mean"},
    # issue 30: FiRe-OPD as released (the preset, with the same rollouts per step: one per prompt),
    # and the selection rules beyond the paper (fire_opd/algorithm/options.py), at the paper's p = 20
    "fire_released": lambda setting, recipe: {
        "preset": "fire-released",
        "sampling.prompts_per_step": recipe.sampling.rollouts_per_step,
    },
    "fire_truncate": {"fire.method": "fire", "fire.filter_mode": "truncate"},
    "fire_verified": {"fire.method": "fire", "fire.filter_mode": "verified"},
    "filter_truncate": {"fire.method": "filter_only", "fire.filter_mode": "truncate"},
    "opd_trust": {"fire.method": "opd", "fire.trust_ratio": True},
    # plain OPD with TRL's rollout layout and learning rate: the same rollouts per step, but every
    # one from a different prompt (TRL's trainer samples one completion per prompt)
    "opd_trl_layout": lambda setting, recipe: {
        "fire.method": "opd",
        "sampling.prompts_per_step": recipe.sampling.rollouts_per_step,
        "sampling.samples_per_prompt": 1,
        "optim.micro_batch_size": recipe.sampling.rollouts_per_step,
        "optim.lr": recipe_lr_of(setting, TRL),
    },
}

# How the demo's table names the variants it shows (the study's tables use the variant names)
VARIANT_LABELS = {
    "opd": "OPD",
    "fire": "FiRe-OPD",
    "fire_released": "FiRe as released",
    "fire_truncate": "FiRe-OPD, truncate",
    "fire_verified": "FiRe-OPD, verified",
    "filter_truncate": "filter, truncate",
    "opd_trust": "OPD, trust ratio",
}

ROW_ORDER = [*VARIANTS, "trl_distillation"]

# The hypotheses beyond the paper (issue 7), tested on the default objective only, to halve their cost.
HYPOTHESES = ["opd_gate", "fire_gate", "fire_score_sum", "fire_score_adv"]

# The four methods of the paper's ablation: what the premise test (brittle-teacher) and steps, the
# default demo setting, run.
PAPER_VARIANTS = ["opd", "fire", "filter_only", "reweight_only"]

# Issue 30's candidates, compared with OPD on the validation split before the held-out study
# (benchmarks/results/study-rules/preregistration.md says how the one carried forward is chosen).
RULE_CANDIDATES = ["opd", "fire_truncate", "fire_verified", "filter_truncate", "opd_trust"]
RULE_SETTINGS = ["steps", "brittle-teacher", "chain", "error-cascade"]

# The grid's variants per setting. With one rollout per prompt (chain) the group filter keeps
# everything, i.e. it is reweight_only, so it runs only where prompts have several rollouts.
STUDY_VARIANTS = {
    "steps": PAPER_VARIANTS,
    "brittle-teacher": PAPER_VARIANTS,
    "error-cascade": PAPER_VARIANTS,
    "chain": ["opd", "fire", "filter_only", "reweight_only", "hard_token", "fire_p10", "fire_p30", *HYPOTHESES],
    "single": [
        "opd",
        "fire",
        "filter_only",
        "reweight_only",
        "hard_token",
        "fire_p10",
        "fire_p30",
        "fire_group",
        "opd_trl_layout",
        *HYPOTHESES,
    ],
}

# Run on the dense objective only: the comparison with TRL (whose objective is the dense one), and
# the hypotheses.
DENSE_ONLY_VARIANTS = {"opd_trl_layout", *HYPOTHESES}

PERCENTILE_SWEEP = {0: "reweight_only", 10: "fire_p10", 20: "fire", 30: "fire_p30"}

# What a user would run instead: TRL 1.16's on-policy DistillationTrainer (exact full-vocabulary
# generalized JSD, beta = 1: reverse KL), same rollouts per step, steps, schedule and clipping.
TRL = "trl_distillation"


def run_name(job: dict) -> str:
    lr = f"-lr{job['lr']:.0e}" if job.get("lr") else ""
    split = "" if job["split"] == "test" else f"-{job['split']}"
    return (
        f"{job['kind']}-{job['setting']}-{job.get('objective', 'na')}-{job.get('variant', 'na')}{lr}"
        f"-s{job['seed']}{split}"
    )


def variant_overrides(name: str, setting: str, recipe: TrainConfig) -> dict[str, Any]:
    """The TrainConfig fields variant `name` sets in `setting` (whose recipe is `recipe`). A
    variant that names a preset gets the preset's fields too: the preset is the variant's
    definition, so the grid's own per-job fields (the objective) never override it."""
    variant: Any = VARIANTS.get(name, {})
    overrides = dict(variant(setting, recipe) if callable(variant) else variant)
    return {**PRESETS.get(overrides.get("preset") or "", {}), **overrides}


def recipe_lr_of(setting: str, objective: str) -> float:
    from fire_opd.demo.run import recipe_lr

    return recipe_lr(setting, objective)


def job_config(job: dict, quick: bool):
    from fire_opd.demo.run import get_setting

    recipe = get_setting(job["setting"]).recipe
    objective = job.get("objective", recipe.loss.objective)
    fields = {
        "seed": job["seed"],
        "loss.objective": objective,
        "optim.lr": job.get("lr") or recipe_lr_of(job["setting"], TRL if job.get("variant") == TRL else objective),
        "logging.progress": False,
        "runtime.threads": 1,
        "output_dir": f"/tmp/fire-opd-study/{run_name(job)}",
    }
    fields.update(variant_overrides(job.get("variant") or "", job["setting"], recipe))
    config = recipe.updated(fields)
    if quick:
        config = config.updated({"optim.steps": 2, "eval.every": 1, "eval.size": 8, "sampling.prompts_per_step": 4})
    return config


def _job(kind: str, setting: str, seed: int, split: str, quick: bool, **fields) -> dict:
    return {"kind": kind, "setting": setting, "seed": seed, "split": split, "quick": quick, **fields}


def _trl_job(setting: str, seed: int, split: str, quick: bool, **fields) -> dict:
    return _job("trl", setting, seed, split, quick, objective="full_vocab", variant=TRL, **fields)


def build_jobs(settings, objectives, variants, seeds, quick: bool, trl: bool = True, split: str = "test") -> list[dict]:
    """The study on the held-out split (or, to choose among variants, the validation split): the
    initial students, every variant x objective x seed, and TRL's trainer on the single-teacher
    settings."""
    from fire_opd.demo.run import get_setting

    jobs = [_job("initial", s, seed, split, quick) for s in settings for seed in seeds]
    jobs += [
        _job("train", s, seed, split, quick, objective=o, variant=v)
        for seed in seeds
        for s in settings
        for o in objectives
        for v in (variants or STUDY_VARIANTS.get(s, list(VARIANTS)))
        if o == "full_vocab" or v not in DENSE_ONLY_VARIANTS
    ]
    if trl:
        jobs += [
            _trl_job(s, seed, split, quick) for seed in seeds for s in settings if len(get_setting(s).teachers) == 1
        ]
    return jobs


def selection_jobs(settings, objectives, seeds, quick: bool, trl: bool = True) -> list[dict]:
    """The learning-rate sweep on the validation split (`--select`): plain OPD (and TRL's trainer)
    at each of the setting's candidate rates."""
    lrs = {s: SELECT_LRS.get(s, SELECT_LRS["single"]) for s in settings}
    jobs = [_job("initial", s, seed, "validation", quick) for seed in seeds for s in settings]
    jobs += [
        _job("train", s, seed, "validation", quick, objective=o, variant="opd", lr=lr)
        for seed in seeds
        for s in settings
        for o in objectives
        for lr in lrs[s]
    ]
    if trl:
        jobs += [_trl_job(s, seed, "validation", quick, lr=lr) for seed in seeds for s in settings for lr in lrs[s]]
    return jobs
