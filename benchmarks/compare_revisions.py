"""Did a change make the kernels slower? An earlier revision against the working tree, interleaved.

    python benchmarks/compare_revisions.py --base 6012a70
    python benchmarks/compare_revisions.py --base HEAD~3 --workloads kl update --rounds 5

Ratios to the matmul floor move with the machine (a CPU whose products are fast shows every
non-product pass as a larger share), so ratios from two days, or two machines, do not say
whether the code changed. This script runs both versions on the same machine in the same minutes:
`git archive <base>` is unpacked into a temporary folder, and each round runs the floor and the
`chunked` method of every workload with each version's own `benchmarks/bench_kernels.py
--worker` (a fresh process per row, the same seeded inputs), the versions' order alternating
between rounds so that a drift of the machine's load falls on both. Reported per workload and
version: the medians over rounds of the floor's and the method's times and of the per-round
ratio, and new / base of that ratio. Results: benchmarks/results/compare-<base>-<device>-<date>.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def resolve_revision(revision: str) -> str | None:
    """The commit `revision` names in this repository (12 hex digits), None if it names none."""
    resolved = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=12", f"{revision}^{{commit}}"], capture_output=True, text=True
    )
    return resolved.stdout.strip() if resolved.returncode == 0 else None


def unpack_revision(commit: str, folder: Path) -> Path:
    """`git archive` of `commit` unpacked into folder/<commit>; returns that tree."""
    tree = folder / commit
    tree.mkdir()
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} failed")
    return tree


def _worker(tree: Path, workload: str, method: str, args) -> float:
    """One row's median time (s) from `tree`'s own bench_kernels worker, with `tree` on the path."""
    from bench_kernels import run_one

    row = run_one(workload, method, args.shape, args.tokens, "cpu", "float32", args.repeats, args.timeout, tree=tree)
    if "error" in row:
        raise SystemExit(f"{tree}: {workload}/{method} failed: {row['error']}")
    return float(row["time_s"])


def compare(trees: dict[str, Path], args) -> list[dict]:
    """Rows {workload, version, round, floor_ms, method_ms} for every round, workload and version."""
    rows = []
    for rnd in range(args.rounds):
        for workload in args.workloads:
            order = list(trees) if rnd % 2 == 0 else list(reversed(trees))
            for version in order:
                floor = _worker(trees[version], workload, "floor", args)
                method = _worker(trees[version], workload, args.method, args)
                rows.append(
                    {
                        "workload": workload,
                        "version": version,
                        "round": rnd,
                        "floor_ms": floor * 1e3,
                        "method_ms": method * 1e3,
                    }
                )
                print(f"round {rnd} {workload:8s} {version:>8s}: x floor {method / floor:.2f}", flush=True)
    return rows


def table(rows: list[dict], base: str, method: str) -> str:
    out = [
        f"| workload | version | floor (ms) | {method} (ms) | x floor per round | x floor (median) | new / base |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        median_ratio = {}
        for version in (base, "new"):
            mine = [r for r in rows if r["workload"] == workload and r["version"] == version]
            ratios = [r["method_ms"] / r["floor_ms"] for r in mine]
            median_ratio[version] = statistics.median(ratios)
            change = "" if version == base else f"{median_ratio['new'] / median_ratio[base]:.2f}"
            out.append(
                f"| {workload} | {version} | {statistics.median(r['floor_ms'] for r in mine):.1f} | "
                f"{statistics.median(r['method_ms'] for r in mine):.1f} | {' '.join(f'{x:.2f}' for x in ratios)} | "
                f"{median_ratio[version]:.2f} | {change} |"
            )
    return "\n".join(out)


def main(argv=None) -> int:
    from bench_kernels import CUDA_ONLY, METHODS, SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a git revision of this repository to compare against")
    workloads = ["logprob", "kl", "jsd_loss", "update"]
    parser.add_argument("--workloads", nargs="+", default=workloads, choices=list(METHODS))
    parser.add_argument("--method", default="chunked", help="the method compared (the floor is always run)")
    parser.add_argument("--shape", default="qwen3-narrow", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (median), after a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="old/new pairs per workload, order alternating")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per row")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or args.tokens < 1:
        parser.error("--rounds, --repeats and --tokens must be at least 1")
    if args.method == "floor" or args.method in CUDA_ONLY or any(args.method not in METHODS[w] for w in args.workloads):
        parser.error(f"--method: expected a CPU method other than the floor of every workload, got {args.method!r}")
    base = resolve_revision(args.base)
    if base is None:
        parser.error(f"--base: expected a git revision of {ROOT}, got {args.base!r}")

    from _results import device_label, write_results

    with tempfile.TemporaryDirectory(prefix="fire-compare-") as tmp:
        rows = compare({base: unpack_revision(base, Path(tmp)), "new": ROOT}, args)
    title = (
        f"{args.method} against the floor, revision {base} and the working tree side by side "
        f"({args.shape}, N = {args.tokens}, fp32, median of {args.repeats} calls per row, {args.rounds} rounds)"
    )
    text = table(rows, base, args.method)
    stem = write_results(args.out, f"compare-{base[:7]}", title, rows, text, device_label())
    print(text)
    print(f"results: {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
