"""`make gpu-check`: everything that needs a GPU, as one command of at most 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py            # on a CUDA machine (what `make gpu-check` runs there)
    python benchmarks/gpu_check.py --dry      # anywhere: tiny shapes on the CPU, Triton interpreted

1. The CUDA tests: `FIRE_OPD_TEST_DEVICE=cuda pytest tests/test_cuda.py` (kernel parity against
   the float64 oracle with native half-precision dots and the GPU tiles, N = 0, int64 offsets
   past 2^31 logits, the fused updates, a trainer smoke test with both objectives).
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
3. Results: benchmarks/results/<gpu>-<date>-gpu-check.{json,md,png}.

--dry runs the same steps on the CPU at tiny shapes (the CUDA-only peers and cases report "needs
CUDA"), writes nothing unless --out is given, and is part of `make test`, so that this script
cannot rot between the rare days a GPU is lent. A row that would start past --budget-s is not
run and says so.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
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


def run_cuda_tests(dry: bool) -> dict:
    """tests/test_cuda.py on the check's device; its summary line and exit status."""
    env = {**os.environ, "FIRE_OPD_TEST_DEVICE": "cpu" if dry else "cuda", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    # pyproject's addopts already has -q: one more would drop pytest's "N passed" line
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_cuda.py"), "-rs"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = next(
        (line for line in reversed(lines) if " passed" in line or " failed" in line or " error" in line),
        lines[-1] if lines else "no output",
    )
    print(proc.stdout[-4000:] if proc.returncode else summary, flush=True)
    return {"returncode": proc.returncode, "summary": summary.strip("= "), "seconds": time.perf_counter() - t0}


def run_anchors(dry: bool, device: str, dtype: str, budget_s: float, started: float, repeats: int) -> list[dict]:
    """Every anchor's methods, each in its own process (one at a time on a GPU, so that timings
    and peaks are undisturbed; the dry run's figures mean nothing, so it runs one per core)."""
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
        for name, (title, workload, shape, methods, published) in ANCHORS.items()
        for method in methods
    ]

    def measure(row: dict) -> dict:
        if row["method"] in bench_kernels.CUDA_ONLY and not device.startswith("cuda"):
            return {**row, "error": "needs CUDA"}
        if time.perf_counter() - started > budget_s:
            return {**row, "error": f"not run: past the {budget_s:.0f}s budget"}
        result = bench_kernels.run_one(
            row["workload"], row["method"], row["shape"], row["tokens"], device, dtype, repeats, timeout=240
        )
        return {**row, **result}

    done = []
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) if dry else 1) as pool:
        for row in pool.map(measure, rows):  # in order: a row prints once it and those before it are done
            bench_kernels._print_row(row)
            done.append(row)
    bench_kernels._add_ratios(done)
    return done


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
    parser.add_argument("--budget-s", type=float, default=450.0, help="no row starts after this many seconds")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; --dry: none)")
    parser.add_argument("--no-tests", action="store_true", help="only the anchors")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import torch

    dry = args.dry or not torch.cuda.is_available()
    if dry and not args.dry:
        print("gpu-check: no CUDA device here, so this is the DRY RUN (tiny shapes on the CPU)", flush=True)
    device, dtype = ("cpu", "float32") if dry else ("cuda", "bfloat16")
    tests = (
        {"returncode": 0, "summary": "not run (--no-tests)", "seconds": 0.0} if args.no_tests else run_cuda_tests(dry)
    )
    rows = run_anchors(dry, device, dtype, args.budget_s, started, repeats=1 if dry else 3)
    result = {
        "device": bench_kernels.device_name(device),
        "date": _dt.date.today().isoformat(),
        "dtype": dtype,
        "dry": dry,
        "provenance": provenance(),
        "tests": tests,
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    text = markdown(result)
    print(text)
    out = args.out if args.out is not None else (None if dry else bench_kernels.RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{result['device']}-{result['date']}-gpu-check{'-dry' if dry else ''}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        stem.with_suffix(".md").write_text(text)
        plot(result, stem.with_suffix(".png"))
        print(f"results: {stem}.json / .md / .png")
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
