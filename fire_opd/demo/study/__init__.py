"""`fire-opd study`: when does FiRe-OPD beat OPD? Every method, objective and seed on the demo
settings, reported as mean ± std over seeds of held-out greedy accuracy and sampled avg@8 /
pass@8 (8 completions per problem at the training temperature), with the regime statistics.

    fire-opd study [--settings steps brittle-teacher] [--seeds 0 1 2] [--objectives full_vocab]
                   [--variants ...] [--jobs 2] [--out benchmarks/results/study] [--select] [--fresh]
                   [--split test|validation] [--quick]

Protocol:
  1. `--select` runs the learning-rate sweep of plain OPD on each setting's *validation* split,
     once per objective, and prints the best; the demo recipes (fire_opd/demo/run.py) hold the
     result. Held-out (test) problems are never used to choose anything.
  2. The grid: each setting x objective x variant x seed with that setting's recipe and the
     objective's learning rate, unchanged across variants; metrics on the held-out split.
  3. Aggregation: `study.json` (every run), `study.md` (tables, with each variant's per-seed
     difference from OPD and its 95 % interval), `study.png` (curves). `--split validation`
     runs the grid on the validation split instead, to choose among variants.

Every run is one job in a process pool (one torch thread each, so a seed reproduces), cached as
`runs/<name>.json` under the output folder with the key of everything that decides it (the job,
the whole config, the setting's asset hashes, the package version and source hash; see
fire_opd/demo/provenance.py) and the commit and date it ran on. A cached run whose key matches is read
back and printed as cached, with its commit; one whose key does not is run again; `--fresh` runs
everything again. The tables name the commits their runs came from.

The parts: `grid.py` (the variants, the jobs, each job's config), `runner.py` (one job: train and
evaluate), `cache.py` (the cache and the process pool), `report.py` (aggregation, tables, plots);
this module is the command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from fire_opd.demo.study.cache import cached_results, run_jobs
from fire_opd.demo.study.grid import OUT_DIR, TRL, VARIANTS, build_jobs, selection_jobs
from fire_opd.demo.study.report import (
    aggregate,
    format_diagnostics,
    format_markdown,
    format_paired,
    format_provenance,
    format_rule_diagnostics,
    metric_values,
    plot_study,
)


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
    parser.add_argument(
        "--split",
        default="test",
        choices=["test", "validation"],
        help="where the grid is evaluated: the held-out split, or validation (to choose among variants)",
    )
    parser.add_argument("--quick", action="store_true", help="two steps per run on 8 problems (a smoke test)")
    parser.add_argument("--no-trl", action="store_true", help="leave out TRL's DistillationTrainer")
    parser.add_argument(
        "--aggregate-only", action="store_true", help="only aggregate the runs already cached under --out (run nothing)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.select:
        jobs = selection_jobs(args.settings, args.objectives, args.seeds, args.quick, trl=not args.no_trl)
        if not args.aggregate_only:
            run_jobs(jobs, args.out, args.jobs, fresh=args.fresh)
        results, stale = cached_results(args.out, "validation", args.quick)
        rows: dict = {}
        for r in results:
            if r["kind"] == "initial":
                rows.setdefault((r["setting"], "initial student (no training)", 0.0), []).append(
                    metric_values(r["initial_accuracy"], r.get("initial_sampled"))
                )
            else:
                name = TRL if r["variant"] == TRL else r["objective"]
                rows.setdefault((r["setting"], name, r["lr"]), []).append(
                    metric_values(r["accuracy"], r.get("sampled"))
                )
        selection: Optional[list[dict]] = [
            {"setting": s, "objective": o, "lr": lr, "accuracy": accs} for (s, o, lr), accs in rows.items()
        ]
        (args.out / "selection.json").write_text(json.dumps(selection, indent=1))
        print(format_markdown({}, selection) + "\n\n" + format_provenance(results, stale))
        return 0
    if not args.aggregate_only:
        jobs = build_jobs(
            args.settings, args.objectives, args.variants, args.seeds, args.quick, trl=not args.no_trl, split=args.split
        )
        run_jobs(jobs, args.out, args.jobs, fresh=args.fresh)
    # every run of the split cached under the output folder that today's code would reproduce, so
    # that separate invocations add up and nothing from other code is reported as today's
    results, stale = cached_results(args.out, args.split, args.quick)
    summary = aggregate(results)
    selection_path = args.out / "selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.is_file() else None
    (args.out / "study.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    markdown = "\n\n".join(
        filter(
            None,
            [
                format_markdown(summary, selection),
                format_paired(results),
                format_rule_diagnostics(results),
                format_diagnostics(results),
                format_provenance(results, stale),
            ],
        )
    )
    (args.out / "study.md").write_text(markdown + "\n")
    print(markdown)
    print(f"plot: {plot_study(summary, args.out / 'study.png')}")
    return 0
