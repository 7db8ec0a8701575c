"""A step's prompt draw against the size of the prompt set: flat from 2,000 to 1,000,000 rows.

    python benchmarks/bench_prompts.py [--quick] [--sizes 2000 100000 1000000]

For each size a JSON-lines file of that many rows is written to a temporary folder and opened
with `load_prompts` (once: `datasets` converts it to a memory-mapped Arrow file); then the
trainer's draw of a step's prompts (`prompt_batch`, 64 prompts a step, the rows converted to
`Problem`s) is timed over consecutive steps: the median and the slowest step. Before this
benchmark existed every drawn row re-read the file from its start to find its line number,
4.7 s of a step at 200,000 rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"


def measure(rows: int, folder: Path, *, steps: int, per_step: int) -> dict:
    from fire_opd.train.data import load_prompts, prompt_batch

    path = folder / f"prompts-{rows}.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"What is {i} + {i % 97}?", "answer": str(i + i % 97)}) + "\n")
    started = time.perf_counter()
    problems = load_prompts(path)
    opened = time.perf_counter() - started
    times = []
    for step in range(steps):
        started = time.perf_counter()
        batch = prompt_batch(problems, step, per_step, seed=0)
        times.append(time.perf_counter() - started)
        assert len(batch) == per_step
    return {
        "rows": rows,
        "file_mib": path.stat().st_size / 2**20,
        "open_s": opened,
        "steps": steps,
        "prompts_per_step": per_step,
        "step_median_ms": 1e3 * statistics.median(times),
        "step_max_ms": 1e3 * max(times),
    }


def render(rows: list[dict]) -> str:
    lines = [
        "| rows | file (MiB) | open once (s) | step draw: median (ms) | slowest (ms) | median / smallest set's |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0]["step_median_ms"]
    for r in rows:
        lines.append(
            f"| {r['rows']:,} | {r['file_mib']:.1f} | {r['open_s']:.1f} | {r['step_median_ms']:.2f} | "
            f"{r['step_max_ms']:.2f} | {r['step_median_ms'] / base:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-step", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 rows, 5 steps, nothing written")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes, steps = ([2_000, 20_000], 5) if args.quick else (args.sizes, args.steps)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            rows.append(measure(size, Path(folder), steps=steps, per_step=args.per_step))
            print(rows[-1], flush=True)
    table = render(rows)
    print(table)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        from _results import device_label, write_results

        write_results(out, "prompts", "A step's prompt draw against the prompt set's size", rows, table, device_label())
    return 0


if __name__ == "__main__":
    sys.exit(main())
