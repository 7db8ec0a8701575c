"""`make gpu-check`: everything that needs a GPU, as one command of at most 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py            # on a CUDA machine (what `make gpu-check` runs there)
    python benchmarks/gpu_check.py --dry      # anywhere: tiny shapes on the CPU, Triton interpreted

1. The CUDA tests: `FIRE_OPD_TEST_DEVICE=cuda pytest tests/test_cuda.py` (kernel parity against
   the float64 oracle with native half-precision dots and the GPU tiles, N = 0, int64 offsets
   past 2^31 logits, the fused updates; trainer smoke tests with both objectives, with bf16
   teachers beside a float32 student, with a bf16 student training through its float32 master
   weights, and with a LoRA student; a bf16 run resumed from its checkpoint (the CUDA RNG states
   saved and set, the optimizer state restored on the device); a verified-filter step whose
   teachers continue under the bf16 autocast they scored in; TRL's DistillationTrainer in bf16
   mixed precision with padded heads).
2. The field's anchor workloads, side by side, each method in its own process
   (benchmarks/bench_kernels.py), time (median of repeats) and peak memory from the CUDA
   allocator, every ratio to the bare matrix products (the floor) of the same run:
     cce      Cut Cross-Entropy's: Gemma 2 2B shapes (V 256,000, D 2,304), N 8,192, log-prob
              forward + backward (published: 135 ms / 1,164 MB on an A100); Liger's fused linear
              cross-entropy and its chunked selective log-prob beside it
     liger    Liger's fused linear JSD: V 128,256, D 4,096, N 8,192, bf16 (published: 182.6 ms /
              8.7 GB on an H100)
     qwen3    Qwen3-8B student / 14B teacher (V 151,936, D 4,096 / 5,120), N 8,192: the full FiRe
              statistics, then the fused student update
   Peers where they import (carried wheels: `make gpu-wheels` here, `.whl` in the device call's
   carry): Apple's cut-cross-entropy, Liger, TRL's trl.kernels, torch.compile'd reference. Both of
   our GPU paths run (`triton`; `chunked` = cuBLAS tiles + Triton folds), so that the `auto`
   backend can be chosen from the measurement.
3. Results: <out>/<gpu>-<date>-gpu-check.{json,md} after the tests and again after every anchor
   row (so that a check stopped at the lent machine's time limit still brings back what it
   measured), the .png at the end, and the tests' log, one line per test as it finishes
   (<stem>-tests.log); <out> is --out, default benchmarks/results. Every file names the code it
   measured (commit where git is there, and the source hash, which holds without it).

Time: the tests stop after --tests-budget-s (240 s; on CUDA 8 pytest-xdist processes share the
GPU, since we expect compiling each shape specialization of the Triton kernels, one CPU core per
process, to take most of the suite's time: not yet measured), and the whole check ends within
--budget-s (480 s): no anchor row starts with less than 30 s left, and none runs past the budget.

--dry runs the same steps on the CPU at tiny shapes (the CUDA-only peers and cases report "needs
CUDA"), writes nothing unless --out is given, and is part of `make test`, so that this script
cannot rot between the rare days a GPU is lent.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_kernels  # noqa: E402
from _results import provenance, provenance_line  # noqa: E402

# name: (what it reproduces, workload, shape, methods, published figure)
ANCHORS = {
    "cce": (
        "Cut Cross-Entropy: Gemma 2 2B log-prob",
        "logprob",
        "gemma2",
        ["floor", "reference", "reference_compiled", "cce", "liger_ce", "liger", "trl", "chunked", "triton"],
        "135 ms / 1,164 MB, A100 (CCE paper, Table 1)",
    ),
    "liger": (
        "Liger: fused linear JSD, V 128,256, D 4,096",
        "jsd_loss",
        "llama3",
        ["floor", "reference", "liger", "trl", "chunked", "triton"],
        "182.6 ms / 8.7 GB, H100 (Liger README)",
    ),
    "qwen3-stats": (
        "Qwen3 8B/14B: FiRe statistics",
        "stats",
        "qwen3-8b-14b",
        ["floor", "reference", "reference_compiled", "chunked", "triton"],
        "",
    ),
    "qwen3-update": (
        "Qwen3 8B/14B: fused student update",
        "update",
        "qwen3-8b-14b",
        ["floor", "reference", "chunked", "triton"],
        "",
    ),
}
GPU_TOKENS = 8192
DRY_TOKENS = 16
OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED")
ROW_TIMEOUT_S = 240  # one method of one anchor, its warm-up and repeats
MIN_ROW_S = 30  # a row that could not finish in less is not started
FIRST = ("floor", "chunked", "triton")  # every anchor's ratios and the `auto` choice need these


def run_cuda_tests(dry: bool, log: Path, budget_s: float, workers: int) -> dict:
    """tests/test_cuda.py on the check's device: one line per test streamed to `log` as it
    finishes (a check stopped at the machine's time limit still brings back what passed), stopped
    after `budget_s`; on CUDA `workers` pytest-xdist processes share the GPU, since most of the
    suite's time there should be Triton compiling each new shape specialization on one CPU core
    (the image has pytest-xdist; without it the tests run in one process).
    Returns the exit status, the summary and the counts."""
    env = {**os.environ, "FIRE_OPD_TEST_DEVICE": "cpu" if dry else "cuda", "PYTHONPATH": str(ROOT)}
    # pyproject's addopts has -q: -vv makes one line per test (and keeps pytest's "N passed" line)
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_cuda.py"), "-rs", "-vv"]
    if not dry and workers > 1 and importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(workers)]
    t0 = time.perf_counter()
    with open(log, "w") as stream:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            returncode = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:  # the whole group: xdist's workers too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    counts = {word.lower(): sum(f" {word}" in line and "::" in line for line in lines) for word in OUTCOMES}
    if returncode is None:
        summary = f"stopped after {budget_s:.0f}s: " + ", ".join(f"{n} {w}" for w, n in counts.items() if n)
        returncode = 124
    else:
        summary = next(
            (line for line in reversed(lines) if " passed" in line or " failed" in line or " error" in line),
            lines[-1] if lines else "no output",
        ).strip("= ")
    # a failure's traceback on the console too: the dry run's log is a temporary file
    print(log.read_text()[-4000:] if returncode else summary, flush=True)
    return {"returncode": returncode, "summary": summary, "counts": counts, "seconds": time.perf_counter() - t0}


def run_anchors(
    dry: bool, device: str, dtype: str, budget_s: float, started: float, repeats: int, checkpoint
) -> list[dict]:
    """Every anchor's methods, each in its own process (one at a time on a GPU, so that timings
    and peaks are undisturbed; the dry run's figures mean nothing, so it runs one per core).
    First the rows `auto` is chosen from (FIRST: the floor and both of our paths on every anchor),
    then the peers, so that a budget cut short costs the comparisons before our own figures. No
    row starts with less than MIN_ROW_S of the budget left, none runs past the budget, and
    `checkpoint(rows)` gets the finished rows after each one."""
    rows = [
        {
            "anchor": name,
            "title": title,
            "workload": workload,
            "shape": "tiny" if dry else shape,
            "method": method,
            "tokens": DRY_TOKENS if dry else GPU_TOKENS,
            "published": published,
        }
        for first in (True, False)
        for name, (title, workload, shape, methods, published) in ANCHORS.items()
        for method in methods
        if (method in FIRST) == first
    ]

    def measure(row: dict) -> dict:
        if row["method"] in bench_kernels.CUDA_ONLY and not device.startswith("cuda"):
            return {**row, "error": "needs CUDA"}
        left = budget_s - (time.perf_counter() - started)
        if left < MIN_ROW_S:
            return {**row, "error": f"not run: past the {budget_s:.0f}s budget"}
        result = bench_kernels.run_one(
            row["workload"], row["method"], row["shape"], row["tokens"], device, dtype, repeats,
            timeout=int(min(ROW_TIMEOUT_S, left)),
        )  # fmt: skip
        return {**row, **result}

    done: list[dict] = []
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) if dry else 1) as pool:
        for row in pool.map(measure, rows):  # in order: a row prints once it and those before it are done
            bench_kernels._print_row(row)
            done.append(row)
            bench_kernels._add_ratios(done)
            checkpoint(done)
    return done


def paths_table(rows: list[dict]) -> list[str]:
    """Our two GPU paths side by side on every anchor, the figures `auto` is chosen from: time and
    peak of `chunked` (cuBLAS tiles + Triton folds) and `triton` (fused tiles), and which is faster."""
    mib = 2**20
    lines = [
        "| anchor | chunked (ms) | triton (ms) | triton / chunked | chunked peak (MiB) | triton peak (MiB) | faster |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (title, *_rest) in ANCHORS.items():
        by_method = {r["method"]: r for r in rows if r["anchor"] == name}
        ours = [by_method.get(m, {"error": "not run"}) for m in ("chunked", "triton")]
        if any("error" in r for r in ours):
            why = "; ".join(f"{m}: {r['error'][:60]}" for m, r in zip(("chunked", "triton"), ours) if "error" in r)
            lines.append(f"| {title} | | | | | | {why} |")
            continue
        chunked, triton = ours
        ratio = triton["time_s"] / chunked["time_s"]
        lines.append(
            f"| {title} | {chunked['time_s'] * 1e3:.1f} | {triton['time_s'] * 1e3:.1f} | {ratio:.2f} | "
            f"{chunked['peak_above_inputs_bytes'] / mib:.0f} | {triton['peak_above_inputs_bytes'] / mib:.0f} | "
            f"{'triton' if ratio < 1 else 'chunked'} |"
        )
    return lines


def markdown(result: dict) -> str:
    mib = 2**20
    lines = [
        f"## GPU check: {result['device']}, {result['date']}, {result['dtype']}"
        + (" (DRY RUN on the CPU, tiny shapes: the figures mean nothing)" if result["dry"] else ""),
        "",
        provenance_line(result["provenance"]),
        "",
        f"CUDA tests: {result['tests']['summary']} ({result['tests']['seconds']:.0f} s).",
        "",
        "Time: median forward + backward of the repeats after a warm-up; peak: tensor memory above the inputs "
        "(CUDA allocator). × floor: against the bare matrix products of the same workload in the same run.",
        "",
        "### Our two paths (what `auto` is chosen from)",
        "",
        *paths_table(result["rows"]),
        "",
    ]
    for name, (title, *_rest, published) in ANCHORS.items():
        lines += [
            f"### {title}" + (f" (published: {published})" if published else ""),
            "",
            "| method | time (ms) | × floor | peak (MiB) | peak × reference |",
            "|---|---|---|---|---|",
        ]
        for r in (r for r in result["rows"] if r["anchor"] == name):
            if "error" in r:
                lines.append(f"| {r['method']} | {r['error'][:80]} | | | |")
            else:
                lines.append(
                    f"| {r['method']} | {r['time_s'] * 1e3:.1f} | {r.get('time_vs_floor', float('nan')):.2f} "
                    f"| {r['peak_above_inputs_bytes'] / mib:.0f} | "
                    f"{r.get('peak_vs_reference', float('nan')):.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ANCHORS), figsize=(4.5 * len(ANCHORS), 7), squeeze=False)
    for col, (name, (title, *_)) in enumerate(ANCHORS.items()):
        ok = [r for r in result["rows"] if r["anchor"] == name and "error" not in r]
        labels = [r["method"] for r in ok]
        axes[0][col].bar(labels, [r["time_s"] * 1e3 for r in ok])
        axes[0][col].set(title=title, ylabel="ms")
        axes[1][col].bar(labels, [r["peak_above_inputs_bytes"] / 2**20 for r in ok])
        axes[1][col].set(ylabel="peak MiB above inputs")
        for ax in axes[:, col]:
            ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"fire-opd GPU check, {result['device']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (automatic without CUDA)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole check ends within this many seconds")
    parser.add_argument("--tests-budget-s", type=float, default=240.0, help="the CUDA tests stop after this long")
    parser.add_argument("--test-workers", type=int, default=8, help="pytest-xdist processes for the CUDA tests")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; --dry: none)")
    parser.add_argument("--no-tests", action="store_true", help="only the anchors")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import torch

    dry = args.dry or not torch.cuda.is_available()
    if dry and not args.dry:
        print("gpu-check: no CUDA device here, so this is the DRY RUN (tiny shapes on the CPU)", flush=True)
    device, dtype = ("cpu", "float32") if dry else ("cuda", "bfloat16")
    result = {
        "device": bench_kernels.device_name(device),
        "date": _dt.date.today().isoformat(),
        "dtype": dtype,
        "dry": dry,
        "provenance": provenance(),
        "torch": torch.__version__,
        "tests": {"returncode": None, "summary": "not run yet", "seconds": 0.0},
        "rows": [],
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    out = args.out if args.out is not None else (None if dry else bench_kernels.RESULTS)
    scratch = tempfile.TemporaryDirectory()
    stem = Path(scratch.name) / "gpu-check"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{result['device']}-{result['date']}-gpu-check{'-dry' if dry else ''}"

    def save(complete: bool = False) -> None:
        """The results so far (every phase and anchor row adds to them), so that a check stopped
        at the machine's limit still brings back what it measured."""
        result["seconds"] = time.perf_counter() - started
        if out is None:
            return
        stem.with_suffix(".json").write_text(json.dumps({**result, "complete": complete}, indent=1))
        stem.with_suffix(".md").write_text(markdown(result))
        if complete:
            plot(result, stem.with_suffix(".png"))

    if args.no_tests:
        result["tests"] = {"returncode": 0, "summary": "not run (--no-tests)", "seconds": 0.0}
    else:
        budget = min(args.tests_budget_s, args.budget_s)
        result["tests"] = run_cuda_tests(dry, stem.with_name(stem.name + "-tests.log"), budget, args.test_workers)
    save()

    def checkpoint(rows: list[dict]) -> None:
        result["rows"] = rows
        save()

    rows = run_anchors(dry, device, dtype, args.budget_s, started, 1 if dry else 3, checkpoint)
    result["rows"] = rows
    save(complete=True)
    print(markdown(result))
    if out is not None:
        print(f"results: {stem}.json / .md / .png / -tests.log")
    scratch.cleanup()
    tests = result["tests"]
    failed = [
        r
        for r in rows
        if "error" in r
        and r["error"] != "needs CUDA"
        and not r["error"].startswith("not run")
        and not r["error"].startswith("No module named")
    ]
    print(
        f"gpu-check finished in {result['seconds']:.0f}s: tests rc {tests['returncode']}, "
        f"{len(rows) - len(failed)} of {len(rows)} anchor rows without a failure"
    )
    return 1 if tests["returncode"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
