"""What a study reports: mean ± std over seeds per setting, objective and variant (`aggregate`),
the Markdown tables with their provenance and diagnostics, and the curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from fire_opd.demo.study.grid import PERCENTILE_SWEEP, ROW_ORDER, run_name

METRICS = ("greedy", "avg@8", "pass@8")  # the columns of every table: greedy accuracy, sampled avg@8 and pass@8


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


def metric_values(greedy: float, sampled: Optional[dict]) -> dict:
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
            entry["initial"].append(metric_values(r["initial_accuracy"], r.get("initial_sampled")))
            for key, value in r["teacher_accuracy"].items():
                entry["teacher"].setdefault(key, []).append(metric_values(value, r.get("teacher_sampled", {}).get(key)))
            entry["regime"].append(r["regime"])
            if r.get("teacher_reliability"):
                entry["reliability"].append(r["teacher_reliability"])
            if r.get("teacher_after_error"):
                entry.setdefault("after_error", []).append(r["teacher_after_error"])
        else:
            entry["train"].setdefault(r["objective"], {}).setdefault(r["variant"], []).append(
                metric_values(r["accuracy"], r.get("sampled"))
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
            for a_key in ("teacher_step_accuracy_after_error", "student_rollouts_with_a_copy_error"):
                values = [r[a_key] for r in entry.get("after_error", []) if r[a_key] == r[a_key]]
                if values:
                    lines.append(f"| {a_key} | {_cell(values)} |")
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


# two-sided 95 % Student t quantiles by degrees of freedom (n - 1 for n paired seeds)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_difference(differences: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-seed differences and its 95 % t interval (NaN bounds
    for one seed, or more seeds than the table holds)."""
    mean, std = mean_std(differences)
    t = T_975.get(len(differences) - 1, float("nan"))
    half = t * std / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def format_paired(results: list[dict], baseline: str = "opd") -> str:
    """Each variant against `baseline` (OPD) on the same setting, objective and seed: the mean
    per-seed difference of every metric and its 95 % interval."""
    runs: dict = {}
    for r in results:
        if r["kind"] == "train":
            key = (r["setting"], r["objective"], r["variant"], r["seed"])
            runs[key] = metric_values(r["accuracy"], r.get("sampled"))
    lines = []
    for setting, objective, variant in sorted({k[:3] for k in runs if k[2] != baseline}):
        seeds = sorted(
            k[3]
            for k in runs
            if k[:3] == (setting, objective, variant) and (setting, objective, baseline, k[3]) in runs
        )
        if not seeds:
            continue
        cells = []
        for metric in METRICS:
            diffs = [
                runs[(setting, objective, variant, seed)][metric] - runs[(setting, objective, baseline, seed)][metric]
                for seed in seeds
                if metric in runs[(setting, objective, variant, seed)]
                and metric in runs[(setting, objective, baseline, seed)]
            ]
            if not diffs:
                cells.append("")
                continue
            mean, low, high = paired_difference(diffs)
            cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" if len(diffs) > 1 else f"{mean:+.3f}")
        lines.append(f"| {setting} | {objective} | {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    header = [
        f"### Against {baseline.upper()}, paired by seed (mean difference [95 % interval])",
        "",
        "| setting | objective | variant | seeds | " + " | ".join(METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    return "\n".join(header + lines)


RULE_COLUMNS = {  # the selection rules' per-step metrics (runner.RULE_METRICS), mean over steps, then seeds
    "fire/token_keep_ratio": "tokens in the loss",
    "fire/truncated_ratio": "rollouts truncated",
    "fire/verified_rollouts": "rollouts verified / step",
    "fire/verified_reliable_ratio": "verified reliable",
    "fire/verify_tokens": "verify tokens / step",
    "time/verify_s": "verify s / step",
}


def format_rule_diagnostics(results: list[dict]) -> str:
    """How much each run's selection keeps: the share of response tokens in the loss, of rollouts
    truncated, and verification's count, verdicts and cost."""
    groups: dict = {}
    for r in results:
        if r.get("diagnostics") and "fire/token_keep_ratio" in r["diagnostics"]:
            groups.setdefault((r["setting"], r["objective"], r["variant"]), []).append(r["diagnostics"])
    if not groups:
        return ""
    lines = [
        "### What each rule keeps (mean over steps, then seeds)",
        "",
        "| setting | objective | variant | " + " | ".join(RULE_COLUMNS.values()) + " |",
        "|---|---|---|" + "---|" * len(RULE_COLUMNS),
    ]
    for (setting, objective, variant), runs in sorted(groups.items()):
        cells = []
        for key in RULE_COLUMNS:
            values = [d[key] for d in runs if d.get(key, float("nan")) == d.get(key)]
            cells.append(f"{mean_std(values)[0]:.3f}" if values else "")
        lines.append(f"| {setting} | {objective} | {variant} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
