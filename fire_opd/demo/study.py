"""`fire-opd study`: when does FiRe-OPD beat OPD? Every method, objective and seed on the demo
settings, reported as mean ± std over seeds of held-out greedy accuracy and sampled avg@8 /
pass@8 (8 completions per problem at the training temperature), with the regime statistics.

    fire-opd study [--settings steps brittle-teacher] [--seeds 0 1 2] [--objectives full_vocab]
                   [--variants ...] [--jobs 2] [--out benchmarks/results/study] [--select] [--fresh]
                   [--quick]

Protocol:
  1. `--select` runs the learning-rate sweep of plain OPD on each setting's *validation* split,
     once per objective, and prints the best; the demo recipes (fire_opd/demo/run.py) hold the
     result. Held-out (test) problems are never used to choose anything.
  2. The grid: each setting x objective x variant x seed with that setting's recipe and the
     objective's learning rate, unchanged across variants; metrics on the held-out split.
  3. Aggregation: `study.json` (every run), `study.md` (tables), `study.png` (curves).

Every run is one job in a process pool (one torch thread each, so a seed reproduces), cached as
`runs/<name>.json` under the output folder with the key of everything that decides it (the job,
the whole config, the setting's asset hashes, the package version and source hash; see
fire_opd/demo/provenance.py) and the commit and date it ran on. A cached run whose key matches is read
back and printed as cached, with its commit; one whose key does not is run again; `--fresh` runs
everything again. The tables name the commits their runs came from.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

from fire_opd.demo.recipes import EVAL_SAMPLES, SELECT_LRS

OUT_DIR = Path("benchmarks/results/study")

# name -> TrainConfig overrides. fire at percentile 0 keeps every rollout, so it *is* reweight_only
# (bit for bit); the percentile sweep reports that row for p = 0.
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
    # plain OPD with TRL's rollout layout and learning rate: the same rollouts per step, but every
    # one from a different prompt (TRL's trainer samples one completion per prompt)
    "opd_trl_layout": lambda setting, recipe: {
        "fire.method": "opd",
        "sampling.prompts_per_step": recipe.sampling.rollouts_per_step,
        "sampling.samples_per_prompt": 1,
        "optim.micro_batch_size": recipe.sampling.rollouts_per_step,
        "optim.lr": _recipe_lr(setting, TRL),
    },
}
ROW_ORDER = [*VARIANTS, "trl_distillation"]
# The grid's variants per setting. With one rollout per prompt (chain) the group filter keeps
# everything, i.e. it is reweight_only, so it runs only where prompts have several rollouts.
HYPOTHESES = ["opd_gate", "fire_gate", "fire_score_sum", "fire_score_adv"]
# The premise test (brittle-teacher) runs the four methods of the paper's ablation; steps, the
# default demo setting, the same.
PAPER_VARIANTS = ["opd", "fire", "filter_only", "reweight_only"]
STUDY_VARIANTS = {
    "steps": PAPER_VARIANTS,
    "brittle-teacher": PAPER_VARIANTS,
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
# the hypotheses, tested on the default objective to halve their cost.
DENSE_ONLY_VARIANTS = {"opd_trl_layout", *HYPOTHESES}
PERCENTILE_SWEEP = {0: "reweight_only", 10: "fire_p10", 20: "fire", 30: "fire_p30"}
# What a user would run instead: TRL 1.16's on-policy DistillationTrainer (exact full-vocabulary
# generalized JSD, beta = 1: reverse KL), same rollouts per step, steps, schedule and clipping.
TRL = "trl_distillation"
CURVE_KEYS = (
    "train/reward",
    "train/response_length",
    "train/full_vocab_reverse_kl",
    "fire/keep_ratio",
    "train/degenerate_fraction",
    "train/truncated_fraction",
)


def run_name(job: dict) -> str:
    lr = f"-lr{job['lr']:.0e}" if job.get("lr") else ""
    split = "" if job["split"] == "test" else f"-{job['split']}"
    return (
        f"{job['kind']}-{job['setting']}-{job.get('objective', 'na')}-{job.get('variant', 'na')}{lr}"
        f"-s{job['seed']}{split}"
    )


def _recipe_lr(setting: str, objective: str) -> float:
    from fire_opd.demo.run import recipe_lr

    return recipe_lr(setting, objective)


def _config(job: dict, quick: bool):
    from fire_opd.demo.run import get_setting

    recipe = get_setting(job["setting"]).recipe
    objective = job.get("objective", recipe.loss.objective)
    variant: Any = VARIANTS.get(job.get("variant") or "", {})
    fields = {
        "seed": job["seed"],
        "loss.objective": objective,
        "optim.lr": job.get("lr") or _recipe_lr(job["setting"], TRL if job.get("variant") == TRL else objective),
        "logging.progress": False,
        "runtime.threads": 1,
        "output_dir": f"/tmp/fire-opd-study/{run_name(job)}",
    }
    fields.update(variant(job["setting"], recipe) if callable(variant) else variant)
    config = recipe.updated(fields)
    if quick:
        config = config.updated({"optim.steps": 2, "eval.every": 1, "eval.size": 8, "sampling.prompts_per_step": 4})
    return config


def run_job(job: dict) -> dict:
    """One study job, in its own process: "initial" (teacher and initial student metrics, the
    regime statistics and the teacher's accuracy from student prefixes) or "train" / "trl" (one
    training run). Greedy accuracy and the sampled metrics on the same problems."""
    import torch

    from fire_opd.demo.regime import continuation_accuracy, measure_regime
    from fire_opd.demo.run import REGIME_ROLLOUTS, load_setting, problem_sets, train_student
    from fire_opd.train.evaluate import greedy_and_sampled
    from fire_opd.train.health import ANSWER_FORMATS
    from fire_opd.train.models import load_causal_lm
    from fire_opd.train.trainer import FireOPDTrainer

    torch.set_num_threads(1)
    quick = job.get("quick", False)
    config = _config(job, quick)
    loaded = load_setting(job["setting"])
    setting, tokenizer, teachers = loaded
    train, evaluation = problem_sets(setting, job["seed"], config.eval.size, eval_split=job["split"])
    samples = EVAL_SAMPLES

    def metrics(model, problems) -> dict:
        return greedy_and_sampled(
            model,
            tokenizer,
            problems,
            max_new_tokens=config.sampling.max_new_tokens,
            samples=samples,
            temperature=config.sampling.temperature,
            seed=job["seed"],
        )

    t0 = time.perf_counter()
    if job["kind"] == "initial":
        trainer = FireOPDTrainer(
            config,
            student=load_causal_lm(_assets() / setting.student),
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
        if len(teachers) == 1:
            result["teacher_reliability"] = continuation_accuracy(
                next(iter(teachers.values())),
                trainer.student,
                tokenizer,
                evaluation,
                max_new_tokens=config.sampling.max_new_tokens,
                temperature=config.sampling.temperature,
                seed=job["seed"],
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
        diag_keys = sorted({k for h in history for k in h if k.startswith("diag/")})
        result = {
            "accuracy": final["accuracy"]["all"],
            "sampled": final["sampled"]["all"],
            "diagnostics": {k: _nanmean([h.get(k, float("nan")) for h in history]) for k in diag_keys},
            "eval_curve": [(h["train/step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h],
            "train_curves": {key: [h.get(key) for h in history] for key in CURVE_KEYS},
        }
    return {
        **job,
        **result,
        "lr": config.optim.lr,
        "steps": config.optim.steps,
        "eval_samples": samples,
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
    student = load_causal_lm(_assets() / setting.student)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    assert trainer.model is not None
    return trainer.model.eval()


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def _assets() -> Path:
    from fire_opd.demo.build_assets import ASSETS_DIR

    return ASSETS_DIR


def job_key(job: dict) -> str:
    """Everything that decides a job's result (provenance.run_key adds version and source)."""
    from fire_opd.demo.provenance import folder_hash, run_key
    from fire_opd.demo.run import get_setting

    setting = get_setting(job["setting"])
    folders = sorted({setting.student, setting.tokenizer, *setting.teachers.values()})
    config = _config(job, job.get("quick", False)).to_dict()
    config.pop("output_dir", None)  # where a run writes its checkpoints decides nothing
    return run_key(
        {
            "job": {k: v for k, v in job.items() if k != "fresh"},
            "config": config,
            "eval_samples": EVAL_SAMPLES,
            "assets": {f: folder_hash(_assets() / f) for f in folders},
        }
    )


def read_cached(job: dict, runs_dir: Path) -> Optional[dict]:
    """The cached result of `job` when one with the same key exists (marked `cached`), else None."""
    path = runs_dir / f"{run_name(job)}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("cache_key") == job_key(job):
            return {**cached, "cached": True}
    return None


def _run_and_cache(args: tuple[dict, Path]) -> dict:
    """Run a job now (in a pool process) and cache it with the commit and date it ran on."""
    from fire_opd.demo.provenance import stamp

    job, runs_dir = args
    result = {**run_job(job), "job": job, "cache_key": job_key(job), **stamp()}
    (runs_dir / f"{run_name(job)}.json").write_text(json.dumps(result))
    return {**result, "cached": False}


def describe(result: dict) -> str:
    """One line: a run's greedy accuracy and avg@K, and whether it ran now or came from the cache."""
    greedy = result.get("accuracy", result.get("initial_accuracy"))
    sampled = result.get("sampled", result.get("initial_sampled")) or {}
    avg = next((f"{k} {v:.3f}" for k, v in sampled.items() if k.startswith("avg@")), "")
    origin = (
        f"cached, ran on commit {result.get('commit', '?')} at {result.get('date', '?')}"
        if result.get("cached")
        else f"ran now in {result['seconds']:.0f}s"
    )
    return f"{run_name(result.get('job', result))}: greedy {greedy:.3f} {avg} ({origin})"


def run_jobs(jobs: list[dict], out_dir: Path, workers: int, fresh: bool = False) -> list[dict]:
    """Every job's result: from the cache where its key matches (unless `fresh`), the others run
    in a pool of `workers` processes."""
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results = [] if fresh else [r for r in (read_cached(job, runs_dir) for job in jobs) if r is not None]
    for i, result in enumerate(results, start=1):
        print(f"[{i}/{len(jobs)}] {describe(result)}", flush=True)
    done = {run_name(r["job"]) for r in results}
    todo = [job for job in jobs if run_name(job) not in done]
    t0 = time.perf_counter()
    if todo:
        with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
            for result in pool.imap_unordered(_run_and_cache, [(job, runs_dir) for job in todo]):
                results.append(result)
                print(f"[{len(results)}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {describe(result)}", flush=True)
    seconds = sum(r["seconds"] for r in results)
    print(
        f"{len(results)} runs: {len(todo)} ran now, {len(results) - len(todo)} from the cache. A fresh run of all "
        f"of them takes about {seconds / max(workers, 1) / 60:.1f} min on this machine with --jobs {workers} "
        f"(the runs' own times, {seconds / 60:.1f} process-minutes, plus about 10 s of start-up each).",
        flush=True,
    )
    return results


# ----------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f} ({len(values)})"


METRICS = ("greedy", "avg@8", "pass@8")  # the columns of every table: greedy accuracy, sampled avg@8 and pass@8


def _metric_values(greedy: float, sampled: Optional[dict]) -> dict:
    """{"greedy", "avg@8", "pass@8"} of one result (the sampled ones absent for runs without them)."""
    out = {"greedy": greedy}
    for key, value in (sampled or {}).items():
        if key.startswith("avg@") or key.startswith("pass@"):
            out[key] = value
    return out


def aggregate(results: list[dict]) -> dict:
    """{setting: {"initial", "teacher": {key}, "regime", "reliability", "train": {objective: {variant}}}}, each
    leaf a list over seeds of {"greedy", "avg@8", "pass@8"}; "curves" the greedy eval curves."""
    out: dict = {}
    for r in sorted(results, key=lambda r: (r["setting"], r["seed"])):
        entry = out.setdefault(
            r["setting"], {"initial": [], "teacher": {}, "regime": [], "reliability": [], "train": {}, "curves": {}}
        )
        if r["kind"] == "initial":
            entry["initial"].append(_metric_values(r["initial_accuracy"], r.get("initial_sampled")))
            for key, value in r["teacher_accuracy"].items():
                entry["teacher"].setdefault(key, []).append(
                    _metric_values(value, r.get("teacher_sampled", {}).get(key))
                )
            entry["regime"].append(r["regime"])
            if r.get("teacher_reliability"):
                entry["reliability"].append(r["teacher_reliability"])
        else:
            entry["train"].setdefault(r["objective"], {}).setdefault(r["variant"], []).append(
                _metric_values(r["accuracy"], r.get("sampled"))
            )
            entry["curves"].setdefault(r["objective"], {}).setdefault(r["variant"], []).append(r["eval_curve"])
    return out


def _metric_cells(runs: list[dict]) -> list[str]:
    return [_cell([r[m] for r in runs if m in r]) for m in METRICS]


def format_markdown(summary: dict, selection: Optional[list[dict]] = None) -> str:
    lines = []
    for setting, entry in summary.items():
        objectives = sorted(entry["train"], key=lambda o: o != "sampled")
        lines += [f"### Setting `{setting}`", ""]
        regime = entry["regime"]
        if regime:
            keys = (
                "initial_reverse_kl_per_token",
                "mean_response_tokens",
                "degenerate_rollout_fraction",
                "teacher_entropy_mean",
                "truncated_rollout_fraction",
                "looping_rollout_fraction",
                "malformed_rollout_fraction",
                "sampled_reward",
            )
            lines += ["| regime statistic (initial student) | mean ± std over seeds |", "|---|---|"]
            lines += [f"| {k} | {_cell([r[k] for r in regime])} |" for k in keys]
            for r_key in (
                "teacher_accuracy_from_student_prefixes",
                "teacher_accuracy_from_correct_student_prefixes",
                "teacher_accuracy_from_own_prefixes",
                "teacher_accuracy_from_correct_own_prefixes",
                "student_rollouts_correct",
                "teacher_rollouts_correct",
            ):
                values = [r[r_key] for r in entry["reliability"] if r.get(r_key, float("nan")) == r.get(r_key)]
                if values:
                    lines.append(
                        f"| {r_key} (prefix cut {entry['reliability'][0]['prefix_cut']:g}) | {_cell(values)} |"
                    )
            lines.append("")
        for objective in objectives or [""]:
            head = "| held-out" + (f", objective `{objective}`" if objective else "") + " | " + " | ".join(METRICS)
            lines += [head + " |", "|---|" + "---|" * len(METRICS)]
            for key, values in entry["teacher"].items():
                lines.append(f"| teacher {key} | " + " | ".join(_metric_cells(values)) + " |")
            lines.append("| student (initial) | " + " | ".join(_metric_cells(entry["initial"])) + " |")
            runs = entry["train"].get(objective, {})
            for variant in [v for v in ROW_ORDER if v in runs]:
                lines.append(f"| {variant} | " + " | ".join(_metric_cells(runs[variant])) + " |")
            lines.append("")
            if all(v in runs for v in PERCENTILE_SWEEP.values()):
                cells = " | ".join(
                    f"p={p}: {_cell([r['greedy'] for r in runs[v]])}" for p, v in PERCENTILE_SWEEP.items()
                )
                lines += [
                    f"Percentile sweep, `fire`, objective `{objective}`, greedy (p=0 is reweight_only): {cells}",
                    "",
                ]
    if selection:
        lines += [
            "### Learning-rate selection (plain OPD, validation split)",
            "",
            "| setting | objective | lr | " + " | ".join(f"validation {m}" for m in METRICS) + " |",
            "|---|---|---|" + "---|" * len(METRICS),
        ]
        for row in sorted(selection, key=lambda r: (r["setting"], r["objective"], r["lr"])):
            lr = f"{row['lr']:.0e}" if row["lr"] else ""
            values = [v if isinstance(v, dict) else {"greedy": v} for v in row["accuracy"]]
            lines.append(
                f"| {row['setting']} | {row['objective']} | {lr} | " + " | ".join(_metric_cells(values)) + " |"
            )
    return "\n".join(lines)


def format_provenance(results: list[dict], stale: list[dict]) -> str:
    """Which commits the reported runs ran on, and which cached runs were left out as stale."""
    commits: dict = {}
    for r in results:
        commits.setdefault((r.get("commit", "unrecorded"), r.get("code_hash", "?")), []).append(r.get("date", "?"))
    lines = ["### Provenance", "", "| commit | source hash | runs | dates |", "|---|---|---|---|"]
    lines += [f"| {c} | {h} | {len(d)} | {min(d)} .. {max(d)} |" for (c, h), d in sorted(commits.items())]
    if stale:
        lines += [
            "",
            f"{len(stale)} cached runs under this folder were made by other code, assets or settings and "
            "are left out (`--fresh`, or running the grid again, replaces them): "
            + ", ".join(sorted(run_name(r) for r in stale)),
        ]
    return "\n".join(lines)


DIAGNOSTICS = (
    "correct",
    "length",
    "truncated",
    "advantage_per_token",
    "with_rejected_token",
    "first_rejected_position",
    "prompt_group_reward",
)


def format_diagnostics(results: list[dict]) -> str:
    """What the rollout filter drops against what it keeps (the trainer's `diag/*` metrics, mean
    over each run's steps, then over seeds), for every run that filters."""
    groups: dict = {}
    for r in results:
        if r.get("diagnostics"):
            groups.setdefault((r["setting"], r["objective"], r["variant"]), []).append(r["diagnostics"])
    if not groups:
        return ""
    lines = [
        "### What the filter drops (`diag/*` metrics, mean over steps, then seeds: kept | dropped)",
        "",
        "| setting | objective | variant | " + " | ".join(DIAGNOSTICS) + " |",
        "|---|---|---|" + "---|" * len(DIAGNOSTICS),
    ]
    for (setting, objective, variant), runs in sorted(groups.items()):
        cells = []
        for key in DIAGNOSTICS:
            pair = []
            for side in ("kept", "dropped"):
                values = [
                    d[f"diag/{side}_{key}"]
                    for d in runs
                    if d.get(f"diag/{side}_{key}", float("nan")) == d.get(f"diag/{side}_{key}")
                ]
                pair.append(f"{mean_std(values)[0]:.3f}" if values else "")
            cells.append(" \\| ".join(pair) if any(pair) else "")
        lines.append(f"| {setting} | {objective} | {variant} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_study(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, o) for s, entry in summary.items() for o in sorted(entry["curves"], key=lambda o: o != "sampled")]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (setting, objective) in zip(axes[0], panels):
        # the curves start at the initial student's accuracy (no point at step 0 without that run)
        initial = [v["greedy"] for v in summary[setting]["initial"]] or [float("nan")]
        for variant in ("opd", "fire", "filter_only", "reweight_only", "hard_token", "fire_group"):
            curves = summary[setting]["curves"][objective].get(variant)
            if not curves:
                continue
            steps = [0] + [s for s, _ in curves[0]]
            per_step = list(zip(*[[sum(initial) / len(initial)] + [a for _, a in c] for c in curves]))
            means = [sum(v) / len(v) for v in per_step]
            stds = [mean_std(list(v))[1] for v in per_step]
            ax.plot(steps, means, marker="o", label=variant)
            ax.fill_between(
                steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.15
            )
        ax.set(title=f"{setting}, objective {objective}", xlabel="step", ylabel="held-out greedy accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the command


def build_jobs(settings, objectives, variants, seeds, quick: bool, trl: bool = True) -> list[dict]:
    from fire_opd.demo.run import get_setting

    jobs = [
        {"kind": "initial", "setting": s, "seed": seed, "split": "test", "quick": quick}
        for s in settings
        for seed in seeds
    ]
    jobs += [
        {"kind": "train", "setting": s, "objective": o, "variant": v, "seed": seed, "split": "test", "quick": quick}
        for seed in seeds
        for s in settings
        for o in objectives
        for v in (variants or STUDY_VARIANTS.get(s, list(VARIANTS)))
        if o == "full_vocab" or v not in DENSE_ONLY_VARIANTS
    ]
    if trl:
        jobs += [
            {
                "kind": "trl",
                "setting": s,
                "objective": "full_vocab",
                "variant": TRL,
                "seed": seed,
                "split": "test",
                "quick": quick,
            }
            for seed in seeds
            for s in settings
            if len(get_setting(s).teachers) == 1
        ]
    return jobs


def cached_results(out_dir: Path, split: str, quick: bool) -> tuple[list[dict], list[dict]]:
    """(current, stale): every run cached under `out_dir` for `split`, split by whether its key
    matches what the same job would be run with today (same config, assets, version and code)."""
    current: list[dict] = []
    stale: list[dict] = []
    for path in sorted((out_dir / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("split") != split or r.get("quick", False) != quick:
            continue
        job = r.get("job")
        if job is None:  # cached before jobs were recorded: its key cannot be checked
            stale.append(r)
            continue
        (current if r.get("cache_key") == job_key(job) else stale).append(r)
    return current, stale


def main(argv: Optional[list[str]] = None) -> int:
    from fire_opd.demo.run import SETTINGS

    parser = argparse.ArgumentParser(
        prog="fire-opd study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=["steps", "brittle-teacher"], choices=sorted(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=["full_vocab"], choices=["sampled", "full_vocab"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: STUDY_VARIANTS of each setting")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument(
        "--select",
        action="store_true",
        help="the learning-rate sweep of plain OPD on the validation split, instead of the grid",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore the cache: run every job again")
    parser.add_argument("--quick", action="store_true", help="two steps per run on 8 problems (a smoke test)")
    parser.add_argument("--no-trl", action="store_true", help="leave out TRL's DistillationTrainer")
    parser.add_argument(
        "--aggregate-only", action="store_true", help="only aggregate the runs already cached under --out (run nothing)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.select:
        lrs = {s: SELECT_LRS.get(s, SELECT_LRS["single"]) for s in args.settings}
        jobs = [
            {"kind": "initial", "setting": s, "seed": seed, "split": "validation", "quick": args.quick}
            for seed in args.seeds
            for s in args.settings
        ]
        jobs += [
            {
                "kind": "train",
                "setting": s,
                "objective": o,
                "variant": "opd",
                "seed": seed,
                "split": "validation",
                "lr": lr,
                "quick": args.quick,
            }
            for seed in args.seeds
            for s in args.settings
            for o in args.objectives
            for lr in lrs[s]
        ]
        if not args.no_trl:
            jobs += [
                {
                    "kind": "trl",
                    "setting": s,
                    "objective": "full_vocab",
                    "variant": TRL,
                    "seed": seed,
                    "split": "validation",
                    "lr": lr,
                    "quick": args.quick,
                }
                for seed in args.seeds
                for s in args.settings
                for lr in lrs[s]
            ]
        if not args.aggregate_only:
            run_jobs(jobs, args.out, args.jobs, fresh=args.fresh)
        results, stale = cached_results(args.out, "validation", args.quick)
        rows: dict = {}
        for r in results:
            if r["kind"] == "initial":
                rows.setdefault((r["setting"], "initial student (no training)", 0.0), []).append(
                    _metric_values(r["initial_accuracy"], r.get("initial_sampled"))
                )
            else:
                name = TRL if r["variant"] == TRL else r["objective"]
                rows.setdefault((r["setting"], name, r["lr"]), []).append(
                    _metric_values(r["accuracy"], r.get("sampled"))
                )
        selection: Optional[list[dict]] = [
            {"setting": s, "objective": o, "lr": lr, "accuracy": accs} for (s, o, lr), accs in rows.items()
        ]
        (args.out / "selection.json").write_text(json.dumps(selection, indent=1))
        print(format_markdown({}, selection) + "\n\n" + format_provenance(results, stale))
        return 0
    if not args.aggregate_only:
        run_jobs(
            build_jobs(args.settings, args.objectives, args.variants, args.seeds, args.quick, trl=not args.no_trl),
            args.out,
            args.jobs,
            fresh=args.fresh,
        )
    # every held-out run cached under the output folder that today's code would reproduce, so that
    # separate invocations add up and nothing from other code is reported as today's
    results, stale = cached_results(args.out, "test", args.quick)
    summary = aggregate(results)
    selection_path = args.out / "selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.is_file() else None
    (args.out / "study.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    markdown = "\n\n".join(
        filter(
            None, [format_markdown(summary, selection), format_diagnostics(results), format_provenance(results, stale)]
        )
    )
    (args.out / "study.md").write_text(markdown + "\n")
    print(markdown)
    print(f"plot: {plot_study(summary, args.out / 'study.png')}")
    return 0
