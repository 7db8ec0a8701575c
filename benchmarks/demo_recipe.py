"""The demo recipe's learning rate: one at which *both* methods the demo shows improve on validation.

    python benchmarks/demo_recipe.py [--setting steps] [--lrs 3e-4 1e-3 3e-3] [--jobs 2]

`fire-opd study --select` picks each setting's learning rate with plain OPD alone (the highest
validation avg@8 whose greedy accuracy beats the initial student's). On `steps` that chose 3e-3,
at which FiRe-OPD then ended below the initial student's greedy accuracy on held-out seed 0
(`benchmarks/results/study/first-rule/`). The demo shows OPD and FiRe-OPD side by side, so its
recipe must suit both: this script runs FiRe-OPD on the same validation problems (seed 0) at each
learning rate of the sweep, reads OPD's runs of `--select`, and picks the highest mean avg@8 of the
two among the learning rates where both end above the initial student on greedy accuracy and
avg@8. Runs are cached like the study's (under benchmarks/results/study/demo-recipe/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fire_opd.demo.study.cache import cached_results, run_jobs  # noqa: E402
from fire_opd.demo.study.grid import OUT_DIR  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="steps")
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--study", type=Path, default=ROOT / OUT_DIR, help="where --select cached OPD's runs")
    parser.add_argument("--out", type=Path, default=ROOT / OUT_DIR / "demo-recipe")
    args = parser.parse_args(argv)
    jobs = [
        {
            "kind": "train",
            "setting": args.setting,
            "objective": "full_vocab",
            "variant": "fire",
            "seed": 0,
            "split": "validation",
            "lr": lr,
            "quick": False,
        }
        for lr in args.lrs
    ]
    fire = {r["lr"]: r for r in run_jobs(jobs, args.out, args.jobs)}
    study, _stale = cached_results(args.study, "validation", False)
    opd = {r["lr"]: r for r in study if r["setting"] == args.setting and r["kind"] == "train" and r["variant"] == "opd"}
    initial = next(r for r in study if r["setting"] == args.setting and r["kind"] == "initial")
    floor = (initial["initial_accuracy"], initial["initial_sampled"]["avg@8"])
    rows, eligible = [], []
    for lr in args.lrs:
        if lr not in opd:
            raise SystemExit(
                f"no validation run of OPD at lr {lr:g} under {args.study}: run `fire-opd study --select "
                f"--settings {args.setting} --seeds 0` first"
            )
        pair = [(r["accuracy"], r["sampled"]["avg@8"]) for r in (opd[lr], fire[lr])]
        ok = all(g > floor[0] and a > floor[1] for g, a in pair)
        mean_avg = sum(a for _, a in pair) / 2
        rows.append(
            f"| {lr:.0e} | {pair[0][0]:.3f} / {pair[0][1]:.3f} | {pair[1][0]:.3f} / {pair[1][1]:.3f} | "
            f"{mean_avg:.3f} | {'yes' if ok else 'no'} |"
        )
        if ok:
            eligible.append((mean_avg, lr))
    lines = [
        f"Demo recipe, setting `{args.setting}`, validation split, seed 0 (initial student: greedy "
        f"{floor[0]:.3f} / avg@8 {floor[1]:.3f})",
        "",
        "| lr | OPD greedy / avg@8 | FiRe-OPD greedy / avg@8 | mean avg@8 | both improve |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    choice = max(eligible)[1] if eligible else None
    lines.append(f"chosen: {choice:.0e}" if choice else "no learning rate makes both methods improve")
    text = "\n".join(lines)
    print(text)
    (args.out / "choice.md").write_text(text + "\n")
    (args.out / "choice.json").write_text(json.dumps({"setting": args.setting, "lr": choice}, indent=1) + "\n")
    return 0 if choice else 1


if __name__ == "__main__":
    sys.exit(main())
