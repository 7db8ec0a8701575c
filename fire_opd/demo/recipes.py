"""The built-in settings and their recipes: data only.

Everything here reaches a study run's cache key through the run's TrainConfig or job (learning
rates, steps, token limits, the swept learning rates) or through the hashes of the asset folders
it names, so fire_opd.demo.provenance leaves this file out of the source hash: choosing a recipe on
the validation split does not invalidate the validation runs that chose it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fire_opd.train.config import TrainConfig


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
# and is used unchanged for every method. The study runs every job on one torch thread
# (grid.job_config), so that a seed reproduces its numbers on a given machine; `make demo` keeps
# torch's default. Across CPUs the float kernels round differently and a run's numbers move.
SINGLE_RECIPE = TrainConfig.from_dict(
    {
        "optim.steps": 150,
        "sampling.prompts_per_step": 32,
        "sampling.samples_per_prompt": 4,
        "optim.micro_batch_size": 128,
        "sampling.max_new_tokens": 8,
        "optim.lr": 3e-4,
        "optim.warmup_steps": 20,
        "optim.min_lr_ratio": 0.1,
        "eval.every": 50,
        "eval.size": 400,
        "fire.percentile": 20.0,
        "logging.report_to": [],
        "checkpoint.overwrite": True,
        "eval.at_start": False,  # the demo evaluates the initial student itself
    }
)
# chain's 40-token limit sits below its longest solutions (up to 46 tokens, "steps" format with
# negative numbers), so about 3.5% of the initial student's rollouts run to the limit without EOS, as
# long reasoning does under the paper's 16k budget.
CHAIN_RECIPE = TrainConfig.from_dict(
    {
        "optim.steps": 100,
        "sampling.prompts_per_step": 64,
        "sampling.samples_per_prompt": 1,
        "optim.micro_batch_size": 64,
        "sampling.max_new_tokens": 40,
        "optim.lr": 3e-4,
        "optim.warmup_steps": 10,
        "optim.min_lr_ratio": 0.1,
        "eval.every": 50,
        "eval.size": 400,
        "fire.percentile": 20.0,
        "logging.report_to": [],
        "checkpoint.overwrite": True,
        "eval.at_start": False,  # the demo evaluates the initial student itself
    }
)
# brittle-teacher (and steps-100, the pre-registered control): chain's recipe with a 44-token limit,
# under which 2% of the steps solutions (the longest, with negative numbers: up to 46 tokens) cannot
# finish.
STEPS_100_RECIPE = CHAIN_RECIPE.updated({"sampling.max_new_tokens": 44})
# steps, the default demo: twice the steps. With 100, the held-out greedy gains were within the noise
# of 400 problems (+0.025 to +0.047 for OPD) and FiRe-OPD ended below the initial student on one seed
# (steps-100 in the study); the learning rate was chosen again on validation for this budget.
STEPS_RECIPE = STEPS_100_RECIPE.updated({"optim.steps": 200, "optim.warmup_steps": 20})

# Learning rate per setting and objective, chosen by `fire-opd study --select` (plain OPD, validation
# split); "trl_distillation" is TRL's DistillationTrainer's, chosen the same way. chain / single: by
# greedy accuracy (the study of a1b98cd, which measured nothing else).
# steps / brittle-teacher (2026-12-01, seed 0, benchmarks/results/study/selection.json): the learning rate
# with the highest validation avg@8 whose greedy accuracy is above the initial student's; only the
# default objective was swept. steps (the demo): that rule chose 3e-3, where FiRe-OPD ends below the
# initial student's greedy accuracy (held-out seed 0, benchmarks/results/study/first-rule/, and on
# validation); the demo recipe must suit both methods it shows, so its lr is the best on validation
# at which both improve on both metrics (benchmarks/demo_recipe.py: 1e-3).
# "sampled" in steps / brittle-teacher / error-cascade (2026-12-05, seed 0, the same rule,
# benchmarks/results/study-rules/sampled-lr/selection.json): steps 1e-4 (avg@8 0.362, greedy 0.650
# against the initial 0.640; 3e-4 has avg@8 0.391 but greedy 0.627); brittle-teacher 3e-4 (avg@8 0.131,
# greedy 0.280 against 0.230); error-cascade: no rate's greedy accuracy is above the initial
# student's (best 0.633 at 3e-4), so the highest avg@8 is taken, 3e-4 (0.393).
RECIPE_LR = {
    "steps": {"sampled": 1e-4, "full_vocab": 1e-3, "trl_distillation": 3e-3},
    "steps-100": {"full_vocab": 1e-3, "trl_distillation": 3e-3},
    "brittle-teacher": {"sampled": 3e-4, "full_vocab": 1e-3, "trl_distillation": 1e-3},
    # error-cascade (2026-12-04, seed 0, benchmarks/results/study-rules/validation/selection.json):
    # 1e-3 by the rule above (validation avg@8 0.689, greedy 0.787 against the initial 0.640);
    # TRL's not swept (the issue-30 study does not run it): steps' rate
    "error-cascade": {"sampled": 3e-4, "full_vocab": 1e-3, "trl_distillation": 3e-3},
    "chain": {"sampled": 3e-4, "full_vocab": 3e-4, "trl_distillation": 1e-4},
    "single": {"sampled": 1e-4, "full_vocab": 3e-4, "trl_distillation": 1e-3},
    "multi-teacher": {"sampled": 1e-4, "full_vocab": 3e-4, "trl_distillation": 1e-3},  # single's (not swept)
}

SETTINGS = {
    "steps": DemoSetting(("chain",), {"chain": "steps/teacher"}, "steps/student_init", "chain/tokenizer", STEPS_RECIPE),
    "brittle-teacher": DemoSetting(
        ("chain",), {"chain": "brittle/teacher"}, "brittle/student_init", "chain/tokenizer", STEPS_100_RECIPE
    ),
    "error-cascade": DemoSetting(
        ("chain",), {"chain": "cascade/teacher"}, "steps/student_init", "chain/tokenizer", STEPS_RECIPE
    ),
    "steps-100": DemoSetting(
        ("chain",), {"chain": "steps/teacher"}, "steps/student_init", "chain/tokenizer", STEPS_100_RECIPE
    ),
    "chain": DemoSetting(("chain",), {"chain": "chain/teacher"}, "chain/student_init", "chain/tokenizer", CHAIN_RECIPE),
    "single": DemoSetting(("arith",), {"arith": "teacher_arith"}, "student_init", "tokenizer", SINGLE_RECIPE),
    "multi-teacher": DemoSetting(
        ("arith", "reverse"),
        {"arith": "teacher_arith", "reverse": "teacher_reverse"},
        "student_init",
        "tokenizer",
        SINGLE_RECIPE,
    ),
}
DEFAULT_SETTING = "steps"
# Settings the study runs but the demo does not offer
STUDY_ONLY_SETTINGS = ("steps-100",)
# What `make demo` trains, side by side: plain OPD, the paper's FiRe-OPD, and the selection rule
# the issue-30 study carried forward from the validation split (names of the study's VARIANTS;
# benchmarks/results/study-rules/outcome.md).
DEMO_VARIANTS = ("opd", "fire", "filter_truncate")
EVAL_SAMPLES = 8  # sampled completions per held-out problem: avg@8 and pass@k, as the FiRe-OPD paper reports
# The learning rates `fire-opd study --select` sweeps per setting (plain OPD and TRL's trainer, on
# the validation split). chain: every lr of the first sweep (1e-4..1e-3) ended below the initial
# student, so it also tries 3e-5; steps-100 / brittle-teacher: 1e-3 was the best of 1e-4..1e-3 in a
# first sweep, so it also tries 3e-3; steps (200 steps): around steps-100's choice, and 1e-4 for the
# sampled objective, which degraded plain OPD at 3e-4 and above (benchmarks/results/study-rules/sampled-lr).
SELECT_LRS = {
    "chain": (3e-5, 1e-4, 3e-4, 1e-3),
    "single": (1e-4, 3e-4, 1e-3),
    "steps": (1e-4, 3e-4, 1e-3, 3e-3),
    "steps-100": (1e-4, 3e-4, 1e-3, 3e-3),
    "brittle-teacher": (1e-4, 3e-4, 1e-3, 3e-3),
    "error-cascade": (1e-4, 3e-4, 1e-3, 3e-3),  # steps' (same student, same recipe)
}
