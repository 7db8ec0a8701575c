"""Issue 30, follow-up 2: how much of the batch filter-truncate should truncate, chosen on the
validation split by the rule benchmarks/results/study-rules/preregistration.md fixed before its runs.

    python benchmarks/truncate_share.py probe      # does the divergence threshold move the cut? probe.json
    python benchmarks/truncate_share.py validate   # OPD and filter-truncate at p = 20, 50, 100, validation, seeds 0-1
    python benchmarks/truncate_share.py choose     # the percentile carried forward: share-choice.json
    python benchmarks/truncate_share.py held-out   # the chosen percentile, held-out, seeds 0-4 (none if 20)
    python benchmarks/truncate_share.py report     # held-out against step 3's OPD runs, and the goal
    python benchmarks/truncate_share.py held-out --percentile 100 --settings chain   # an exploratory check
    python benchmarks/truncate_share.py report --percentile 100 --settings chain

`filter_truncate` (`fire.method: filter_only`, `fire.filter_mode: truncate`) flags the rollouts whose
mean teacher log-prob is below the batch's `fire.percentile`-th percentile (20) and cuts each after
its first token whose teacher probability is below `fire.divergence_prob` (0.1). `probe` measures
how far that threshold moves the cut; the candidates of `validate` are percentiles.

The candidates are study variants this script adds to the study's grid. They live here, not in
fire_opd/demo/study/grid.py, because the study caches each run under a key that includes a hash of
the package's source: an edit to the grid would re-key every committed run, and the held-out OPD
runs this follow-up pairs with (`study-rules/runs/`) would have to run again. The study's process
pool spawns its workers, and a spawned worker imports this script as its main module, so the
workers see the added variants as the parent does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from choose_rule import TIE, setting_means  # noqa: E402  (this script's folder is on sys.path)
from rule_outcome import UNRELIABLE, cell, paired  # noqa: E402

from fire_opd.demo.study import grid  # noqa: E402
from fire_opd.demo.study import main as study_main  # noqa: E402
from fire_opd.demo.study.report import paired_difference  # noqa: E402

RESULTS = ROOT / "benchmarks/results/study-rules"
OUT = RESULTS / "truncate-share"
FIXED = 20.0  # the pre-registered percentile: the study's own `filter_truncate`
PERCENTILES = (FIXED, 50.0, 100.0)
PROBE_THRESHOLDS = (0.01, 0.03, 0.1, 0.3, 0.5)
PROBE_STEPS = 3
KEEP = "fire/token_keep_ratio"


def variant(percentile: float) -> str:
    """The study variant of filter-truncate flagging the rollouts below `percentile`."""
    return "filter_truncate" if percentile == FIXED else f"filter_truncate_p{percentile:g}"


for _percentile in PERCENTILES:
    if variant(_percentile) not in grid.VARIANTS:
        grid.VARIANTS[variant(_percentile)] = {**grid.VARIANTS["filter_truncate"], "fire.percentile": _percentile}
        grid.ROW_ORDER.insert(grid.ROW_ORDER.index("filter_truncate") + 1, variant(_percentile))


def probe() -> None:
    """The share of response tokens filter-truncate keeps over the first PROBE_STEPS steps of each
    setting's validation job (seed 0) at each divergence threshold: equal shares mean the threshold
    does not move the cut."""
    import torch

    from fire_opd.demo.run import load_setting, problem_sets, train_student

    torch.set_num_threads(2)
    rows = []
    for setting in grid.RULE_SETTINGS:
        loaded = load_setting(setting)
        train, evaluation = problem_sets(loaded[0], 0, 8, eval_split="validation")
        job = {"kind": "train", "setting": setting, "seed": 0, "split": "validation", "quick": False,
               "objective": "full_vocab", "variant": "filter_truncate"}  # fmt: skip
        for threshold in PROBE_THRESHOLDS:
            config = grid.job_config(job, False)
            config = config.updated(
                {
                    "optim.steps": PROBE_STEPS,
                    "eval.every": 0,
                    "fire.divergence_prob": threshold,
                    "output_dir": f"/tmp/fire-opd-probe/{setting}-{threshold:g}",
                }
            )
            history = train_student(setting, config, loaded=loaded, problems=(train, evaluation[:8]))["history"]
            keep = [h[KEEP] for h in history if KEEP in h]
            rows.append({"setting": setting, "divergence_prob": threshold, "token_keep_ratio": sum(keep) / len(keep)})
    print(f"share of response tokens kept by filter_truncate (p = 20), first {PROBE_STEPS} steps, seed 0, validation")
    print("| setting | " + " | ".join(f"{t:g}" for t in PROBE_THRESHOLDS) + " |")
    print("|---|" + "---|" * len(PROBE_THRESHOLDS))
    for setting in grid.RULE_SETTINGS:
        cells = [f"{r['token_keep_ratio']:.3f}" for r in rows if r["setting"] == setting]
        print(f"| {setting} | " + " | ".join(cells) + " |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "probe.json").write_text(json.dumps({"steps": PROBE_STEPS, "seed": 0, "rows": rows}, indent=1) + "\n")


def held_out_dir() -> Path:
    """Where the held-out runs go: apart from the validation runs, since the study writes one
    `study.json` per folder, for the split it ran."""
    return OUT / "held-out"


def study(out: Path, split: str, variants: list[str], seeds: list[int], settings: list[str], quick: bool) -> None:
    argv = ["--split", split, "--settings", *settings, "--variants", *variants, "--seeds", *map(str, seeds)]
    study_main([*argv, "--no-trl", "--jobs", "2", "--out", str(out), *(["--quick"] if quick else [])])


def choose() -> float:
    """The percentile with the highest minimum over the settings of its mean validation avg@8
    difference from OPD; a tie within TIE of that best goes to the fixed 20."""
    runs = [r for r in json.loads((OUT / "study.json").read_text())["runs"] if r["split"] == "validation"]
    rows = []
    for percentile in PERCENTILES:
        means = setting_means(runs, variant(percentile), OUT)
        keep = {
            s: [r["diagnostics"][KEEP] for r in runs if r.get("variant") == variant(percentile) and r["setting"] == s]
            for s in grid.RULE_SETTINGS
        }
        rows.append(
            {
                "percentile": percentile,
                "settings": means,
                "minimum": min(m["mean"] for m in means.values()),
                "token_keep_ratio": {s: sum(v) / len(v) for s, v in keep.items()},
            }
        )
    best = max(r["minimum"] for r in rows)
    tied = [r["percentile"] for r in rows if r["minimum"] >= best - TIE]
    chosen = FIXED if FIXED in tied else max(rows, key=lambda r: r["minimum"])["percentile"]
    print("mean avg@8 difference from OPD on the validation split (2 seeds per cell)")
    print("| percentile | " + " | ".join(grid.RULE_SETTINGS) + " | minimum |")
    print("|---|" + "---|" * (len(grid.RULE_SETTINGS) + 1))
    for r in rows:
        mark = " **(chosen)**" if r["percentile"] == chosen else ""
        cells = " | ".join(f"{r['settings'][s]['mean']:+.3f}" for s in grid.RULE_SETTINGS)
        print(f"| {r['percentile']:g}{mark} | {cells} | {r['minimum']:+.3f} |")
    print(f"tied within {TIE} of the best minimum {best:+.3f}: {tied}; carried forward: {chosen:g}")
    print("\nshare of response tokens kept (fire/token_keep_ratio, mean over steps and seeds):")
    print("| setting | " + " | ".join(f"p = {p:g}" for p in PERCENTILES) + " | falls as p rises |")
    print("|---|" + "---|" * (len(PERCENTILES) + 1))
    falls = {}
    for setting in grid.RULE_SETTINGS:
        keep = [r["token_keep_ratio"][setting] for r in rows]
        falls[setting] = all(a > b for a, b in zip(keep, keep[1:]))
        print(
            f"| {setting} | " + " | ".join(f"{k:.3f}" for k in keep) + f" | {'yes' if falls[setting] else '**no**'} |"
        )
    by_p = {r["percentile"]: r["settings"] for r in rows}
    steps_gap = by_p[100.0]["steps"]["mean"] - by_p[FIXED]["steps"]["mean"]
    cascade_gap = by_p[100.0]["error-cascade"]["mean"] - by_p[FIXED]["error-cascade"]["mean"]
    print("\npre-registered predictions (validation):")
    print(f"- the share of tokens kept falls from p = 20 to 50 to 100 everywhere: {verdict(all(falls.values()))}")
    print(f"- steps: p = 100 below p = 20 by more than 0.01 ({steps_gap:+.3f}): {verdict(steps_gap < -0.01)}")
    print(f"- error-cascade: p = 100 above p = 20 by >= 0.01 ({cascade_gap:+.3f}): {verdict(cascade_gap >= 0.01)}")
    choice = {"metric": "avg@8", "tie": TIE, "rows": rows, "tied": tied, "chosen": chosen}
    (OUT / "share-choice.json").write_text(json.dumps(choice, indent=1) + "\n")
    return chosen


def verdict(holds: bool) -> str:
    return "holds" if holds else "**refuted**"


def chosen() -> float:
    return json.loads((OUT / "share-choice.json").read_text())["chosen"]


def report(percentile: float, settings: list[str]) -> None:
    """`percentile` (the chosen one by default) on held-out problems against step 3's OPD runs
    (same code), and the goal."""
    held_out = json.loads((RESULTS / "study.json").read_text())["runs"]
    if percentile != FIXED:
        ours = [r for r in json.loads((held_out_dir() / "study.json").read_text())["runs"] if r["split"] == "test"]
        codes = {r["code_hash"] for r in held_out + ours}
        if len(codes) != 1:
            raise SystemExit(f"the runs to pair came from different code: {sorted(codes)}")
        held_out += ours
    name = variant(percentile)
    print(f"held-out, seeds 0-4: {name} (p = {percentile:g}) against OPD, paired by seed, mean [95 % interval]")
    print("| setting | greedy | avg@8 | pass@8 | the goal (avg@8) |")
    print("|---|---|---|---|---|")
    met = True
    for setting in settings:
        mean, low, _ = paired_difference(paired(held_out, name, setting, "avg@8"))
        ok = mean >= -0.01 and (setting not in UNRELIABLE or (mean >= 0.02 and low > 0))
        met &= ok
        cells = " | ".join(cell(paired(held_out, name, setting, m)) for m in ("greedy", "avg@8", "pass@8"))
        print(f"| {setting} | {cells} | {'met' if ok else 'NOT met'} |")
    if settings == grid.RULE_SETTINGS:
        print(f"goal {'MET' if met else 'NOT MET'}")


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["probe", "validate", "choose", "held-out", "report"])
    parser.add_argument("--quick", action="store_true", help="validate with two steps per run on 8 problems")
    parser.add_argument("--out", type=Path, default=OUT, help=f"results folder (default: {OUT.relative_to(ROOT)})")
    parser.add_argument(
        "--percentile", type=float, choices=PERCENTILES, help="held-out / report: this one, not the chosen"
    )
    parser.add_argument("--settings", nargs="+", choices=grid.RULE_SETTINGS, default=grid.RULE_SETTINGS)
    args = parser.parse_args()
    OUT = args.out
    percentile = args.percentile
    if args.step == "probe":
        probe()
    elif args.step == "validate":
        study(OUT, "validation", ["opd", *map(variant, PERCENTILES)], [0, 1], grid.RULE_SETTINGS, args.quick)
    elif args.step == "choose":
        choose()
    elif args.step == "held-out":
        percentile = chosen() if percentile is None else percentile
        if percentile == FIXED:
            print(f"p = 20: its held-out runs are step 3's ({RESULTS / 'runs'}); nothing to run")
            return
        # the initial students' held-out jobs are step 3's: the cache reads them back when their
        # key (same code, config and assets) still matches, and runs them again if it does not
        runs = held_out_dir() / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        for setting in args.settings:
            for path in (RESULTS / "runs").glob(f"initial-{setting}-na-na-s[0-4].json"):
                if not (runs / path.name).exists():
                    shutil.copy(path, runs / path.name)
        study(held_out_dir(), "test", [variant(percentile)], [0, 1, 2, 3, 4], args.settings, quick=False)
    else:
        report(chosen() if percentile is None else percentile, args.settings)


if __name__ == "__main__":
    main()
