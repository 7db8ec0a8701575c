"""What `fire.filter_mode: verified` costs: the teachers' continuations of the flagged rollouts.

    python benchmarks/bench_verify.py                   # this tree: 8 steps of the demo's `steps` setting
    python benchmarks/bench_verify.py --base cc61115    # and an earlier revision, interleaved
    python benchmarks/bench_verify.py --quick           # one step, nothing written (make test)

Trains the demo's `steps` setting (its shipped tiny student and teacher) with the study's
`fire_verified` variant (FiRe-OPD, `fire.filter_mode: verified`) for --steps steps and reports
the means per step: the verification's time (`time/verify_s`), the student's sampling of the
whole batch for scale (`time/sample_s`), the flagged rollouts the teacher continued, the tokens
it generated and the generate calls that took (calls of `greedy_continuations`, which every
revision verifies through). Each run is a fresh process. With --base, the earlier revision is
unpacked with `git archive` and the two alternate over --rounds, so that a drift of the machine's
load falls on both; the verification's decisions are compared too (they should agree). Results:
benchmarks/results/verify-<device>-<date>[-<base>].md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

KEYS = ("time/verify_s", "time/sample_s", "fire/verified_rollouts", "fire/verify_tokens")


def worker(steps: int) -> dict:
    """One run in this process, on the fire_opd that is first on sys.path."""
    import fire_opd.train.verify as verify
    from fire_opd.demo.run import get_setting, train_student
    from fire_opd.demo.study.grid import VARIANTS

    calls = [0]
    real = verify.greedy_continuations

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    verify.greedy_continuations = counted
    with tempfile.TemporaryDirectory() as out:
        config = get_setting("steps").recipe.updated(
            {
                **VARIANTS["fire_verified"],
                "optim.steps": steps,
                "eval.every": 0,
                "checkpoint.save_every": 0,
                "logging.progress": False,
                "logging.report_to": [],
                "output_dir": out,
            }
        )
        history = train_student("steps", config)["history"]
    means = {key: statistics.mean(row[key] for row in history) for key in KEYS}
    return {
        **means,
        "package": str(Path(verify.__file__).resolve().parents[2]),  # the tree whose fire_opd ran
        "generate_calls": calls[0] / steps,
        "reliable": [row["fire/verified_reliable"] for row in history],
    }


def run(tree: Path, steps: int) -> dict:
    """`worker` in a fresh process with `tree`'s package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    script = Path(__file__).resolve()
    done = subprocess.run(
        [sys.executable, str(script), "--worker", "--steps", str(steps)],
        cwd=tree, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{tree}: the run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["package"]) != tree.resolve():
        raise SystemExit(f"{tree}: the run imported fire_opd from {result['package']}")
    return result


def table(rows: dict[str, list[dict]]) -> str:
    """Medians over rounds of each version's per-step means."""
    lines = [
        "| version | verify s / step | sample s / step | rollouts continued / step | tokens / step "
        "| generate calls / step |",
        "|---|---|---|---|---|---|",
    ]
    for version, runs in rows.items():
        cell = {key: statistics.median(r[key] for r in runs) for key in (*KEYS, "generate_calls")}
        lines.append(
            f"| {version} | {cell['time/verify_s']:.3f} | {cell['time/sample_s']:.3f} | "
            f"{cell['fire/verified_rollouts']:.1f} | {cell['fire/verify_tokens']:.1f} | {cell['generate_calls']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base", help="an earlier revision to run beside this tree")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="1 step, 1 round, nothing written (make test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 1, 1
    if args.steps < 1 or args.rounds < 1:
        parser.error(f"--steps and --rounds must be at least 1, got {args.steps} and {args.rounds}")
    if args.worker:
        print(json.dumps(worker(args.steps)))
        return 0

    from _results import device_label, write_results
    from compare_revisions import resolve_revision, unpack_revision

    base = resolve_revision(args.base) if args.base else None
    if args.base and base is None:
        parser.error(f"--base: expected a git revision of {ROOT}, got {args.base!r}")
    with tempfile.TemporaryDirectory(prefix="fire-verify-") as tmp:
        trees = {base[:7]: unpack_revision(base, Path(tmp)), "this tree": ROOT} if base else {"this tree": ROOT}
        rows: dict[str, list[dict]] = {version: [] for version in trees}
        for rnd in range(args.rounds):
            for version in list(trees) if rnd % 2 == 0 else list(reversed(trees)):
                rows[version].append(run(trees[version], args.steps))
                last = rows[version][-1]
                print(
                    f"round {rnd} {version:>10s}: verify {last['time/verify_s']:.3f} s / step, "
                    f"{last['generate_calls']:.1f} calls / step",
                    flush=True,
                )
    same = len({json.dumps(r["reliable"]) for runs in rows.values() for r in runs}) == 1
    command = f"python benchmarks/bench_verify.py --steps {args.steps} --rounds {args.rounds}" + (
        f" --base {base[:7]}" if base else ""
    )
    decisions = (
        "the same in every run"
        if same
        else "NOT the same in every run: " + json.dumps({v: [r["reliable"] for r in runs] for v, runs in rows.items()})
    )
    report = (
        f"`{command}`: medians over {args.rounds} rounds of each run's per-step means.\n\n{table(rows)}\n\n"
        f"The verification's decisions (reliable rollouts per step) were {decisions}."
    )
    print(report)
    if args.quick:
        return 0
    stem = write_results(
        args.out or ROOT / "benchmarks" / "results", "verify" + (f"-{base[:7]}" if base else ""),
        f"`fire.filter_mode: verified`, the teacher's continuations ({args.steps} steps of `steps`)",
        rows, report, device_label(),
    )  # fmt: skip
    print(f"\nresults: {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
