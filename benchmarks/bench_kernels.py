"""Side-by-side kernel benchmark: fire-opd against the peers and against the matmul floor.

    python benchmarks/bench_kernels.py                 # model-pair shapes + scaling sweeps
    python benchmarks/bench_kernels.py --quick         # tiny shapes, seconds (used by `make test`)
    python benchmarks/bench_kernels.py --shapes qwen3 --tokens 256 --repeats 5

Workloads (forward + backward, same seeded inputs for every method):
  logprob  the student's log-prob and entropy, both with gradient (TRL 1.16's
           ChunkedLogProbFunction is the peer; Liger 0.8's chunked selective log-prob, the
           per-token log-prob of its PPO / GRPO losses, gives the log-prob alone ("liger"); on
           CUDA also Apple's cut-cross-entropy `linear_cross_entropy` ("cce") and Liger's fused
           linear cross-entropy ("liger_ce"), log-prob alone too). Floor: forward, recompute, two
           backward products (4).
  kl       reverse KL(student || teacher) with gradient, and the student's entropy (TRL 1.16's
           ChunkedDivergenceFunction at beta = 1 and Liger's chunked JSD loss at beta = 1 are the
           peers). Floor: both models' forward and recompute, two backward products (6).
  jsd_loss the generalized JSD (beta 0.5) alone, with gradient: Liger's fused linear JSD
           benchmark (V 128,256, D 4,096, N 8,192) as the GPU check runs it; Liger's
           LigerFusedLinearJSDLoss and TRL 1.16's ChunkedDivergenceFunction are the peers.
           Floor: as kl (6 products).
  stats    FiRe-OPD token statistics: student log-prob and entropy (with gradient), teacher
           log-prob and entropy. Floor: both models' forward products, one recompute of the
           student logits, the student's two backward products (5 products).
  jsd      the same plus a generalized-JSD divergence with gradient (Liger's chunked JSD loss is
           the peer here). Floor: two forward sweeps of both models, a backward recompute of
           both, two backward products (8 products).
  update   the fused student update (teacher statistics precomputed at scoring time; the
           per-token loss gradient known in the forward pass). Floor: one forward product and
           the two backward products (3 products).
Every method runs in a fresh process; time is the median over repeats, memory the peak
above the inputs: tensor allocations (CPU: profiler allocation events, one extra run; CUDA:
allocator), with the process RSS as a second column. Ratios are to the floor of the same run. Results go
to benchmarks/results/<device>-<date>.json and .md (and a PNG plot of the sweeps).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from _memory import reset_peak_rss, status_bytes, tensor_peak_bytes  # noqa: E402
from _peers import method_fn  # noqa: E402  (one adapter per method)
from _results import provenance, provenance_line, result_file  # noqa: E402

# Model pairs (vocab, student D, teacher D): Qwen3 4B student / 8B teacher, Llama 3 8B, Gemma 2 2B.
SHAPES = {
    "qwen3": {"vocab": 151_936, "d_student": 2560, "d_teacher": 4096},
    "llama3": {"vocab": 128_256, "d_student": 4096, "d_teacher": 4096},
    "gemma2": {"vocab": 256_000, "d_student": 2304, "d_teacher": 2304},
    "tiny": {"vocab": 1_031, "d_student": 48, "d_teacher": 64},
    # the Qwen3 vocabulary with small hidden sizes: the vocabulary-bound regime, and CPU-sized
    "qwen3-narrow": {"vocab": 151_936, "d_student": 256, "d_teacher": 384},
    # the GPU check's Qwen3 pair (Qwen3-8B student, Qwen3-14B teacher)
    "qwen3-8b-14b": {"vocab": 151_936, "d_student": 4096, "d_teacher": 5120},
}
# Which shapes each workload runs by default (the CPU budget of one run is ~15 minutes); every
# workload of METHODS has one (tests/test_benchmarks.py)
DEFAULT_PLAN = {
    "logprob": ["qwen3-narrow"],
    "jsd_loss": ["qwen3-narrow"],
    "kl": ["qwen3-narrow"],
    "stats": ["qwen3", "llama3", "gemma2"],
    "jsd": ["qwen3"],
    "update": ["qwen3", "gemma2"],
}
METHODS = {
    "logprob": ["floor", "reference", "liger", "trl", "chunked", "triton"],
    "jsd_loss": ["floor", "reference", "liger", "trl", "chunked", "triton"],
    "kl": ["floor", "reference", "liger", "trl", "chunked", "triton"],
    "stats": ["floor", "reference", "reference_compiled", "chunked", "triton"],
    "jsd": ["floor", "reference", "liger", "chunked", "triton"],
    "update": ["floor", "reference", "chunked", "triton"],
}
PRODUCTS = {"logprob": 4, "kl": 6, "jsd_loss": 6, "stats": 5, "jsd": 8, "update": 3}
# Peers that run only on CUDA (their kernels have no CPU path)
CUDA_ONLY = {"triton", "cce", "liger_ce"}


# ----------------------------------------------------------------------------- worker side


def _make_inputs(shape: dict, tokens: int, device, dtype, seed: int = 0):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    v, ds, dt = shape["vocab"], shape["d_student"], shape["d_teacher"]

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    inputs = {
        "s_h": rand(tokens, ds).requires_grad_(),
        "s_w": rand(v, ds, scale=ds**-0.5).requires_grad_(),
        "t_h": rand(tokens, dt),
        "t_w": rand(v, dt, scale=dt**-0.5),
        "targets": torch.randint(0, v, (tokens,), generator=gen).to(device),
        "old": (-torch.rand(tokens, generator=gen) * 3).to(device),
        "adv": torch.randn(tokens, generator=gen).to(device),
    }
    return inputs


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape] if args.shape in SHAPES else json.loads(args.shape)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    x = _make_inputs(shape, args.tokens, device, dtype)
    input_bytes = sum(t.numel() * t.element_size() for t in x.values())
    grad_bytes = x["s_h"].numel() * x["s_h"].element_size() + x["s_w"].numel() * x["s_w"].element_size()
    fn = method_fn(args.method, args.workload, x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import gc

        gc.collect()
        reset_peak_rss()  # the peak excludes the transients of input creation
        base = status_bytes("VmRSS")
    times = []
    for i in range(args.repeats + 1):  # the first run warms up (and compiles)
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
        del out
    if device.type == "cuda":
        tensor_peak = torch.cuda.max_memory_allocated() - base
        working_set = tensor_peak - grad_bytes  # the allocator keeps no timeline: the gradients' share
        rss_peak = None
    else:
        rss_peak = max(0, status_bytes("VmHWM") - base)
        tensor_peak, working_set = tensor_peak_bytes(fn)  # one more run, under the profiler (not timed)
    return {
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_above_inputs_bytes": max(0, tensor_peak),
        "working_set_bytes": working_set,
        "rss_peak_above_inputs_bytes": rss_peak,
        "input_bytes": input_bytes,
        "grad_bytes": grad_bytes,
    }


# ----------------------------------------------------------------------------- driver side


def run_one(workload, method, shape, tokens, device, dtype, repeats, timeout, tree: Path | None = None) -> dict:
    """One row in a fresh worker process. `tree`: another checkout whose own worker script runs,
    with that checkout's packages first on the path (benchmarks/compare_revisions.py)."""
    named = isinstance(shape, str)
    cmd = [
        sys.executable,
        str(tree / "benchmarks" / "bench_kernels.py") if tree else __file__,
        "--worker",
        "--workload",
        workload,
        "--method",
        method,
        "--shape",
        shape if named else json.dumps(shape),
        "--tokens",
        str(tokens),
        "--device",
        device,
        "--dtype",
        dtype,
        "--repeats",
        str(repeats),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cwd = None
    if tree:
        env["PYTHONPATH"] = str(tree)
        cwd = tempfile.gettempdir()  # outside both checkouts: the installed package must not shadow `tree`
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def run_suite(args, checkpoint=None) -> dict:
    """All workloads, then the sweeps; `checkpoint(result)` is called after every row so that a
    long run that fails late keeps what it measured."""
    device = args.device
    rows = []
    sweeps: list = []
    result = {
        "device": device_name(device),
        "date": _dt.date.today().isoformat(),
        "dtype": args.dtype,
        "torch_threads": os.cpu_count(),
        "provenance": provenance(),
        "rows": rows,
        "sweeps": sweeps,
    }
    for workload in args.workloads:
        shapes = args.shapes or (["tiny"] if args.quick else DEFAULT_PLAN[workload])
        for shape in shapes:
            for method in METHODS[workload]:
                if method in CUDA_ONLY and not device.startswith("cuda"):
                    continue
                if method == "reference_compiled" and args.quick:
                    continue
                res = run_one(workload, method, shape, args.tokens, device, args.dtype, args.repeats, args.timeout)
                rows.append({"workload": workload, "shape": shape, "method": method, "tokens": args.tokens, **res})
                _print_row(rows[-1])
                if checkpoint:
                    checkpoint(result)
    _add_ratios(rows)
    if not (args.quick or args.no_sweeps):
        run_sweeps(args, sweeps, lambda: checkpoint(result) if checkpoint else None)
    return result


def run_sweeps(args, out: list, checkpoint) -> list[dict]:
    """Peak memory and time as N grows (fixed V) and as V grows (fixed N): chunked vs reference."""
    base = {"vocab": 65_536, "d_student": 1024, "d_teacher": 1024}
    for tokens in (64, 128, 256, 512):
        for method in ("reference", "chunked"):
            res = run_one("stats", method, base, tokens, args.device, args.dtype, 2, args.timeout)
            out.append({"sweep": "tokens", "tokens": tokens, "vocab": base["vocab"], "method": method, **res})
            checkpoint()
            _print_row(
                {"workload": "sweep-N", "shape": f"V={base['vocab']}", "method": method, "tokens": tokens, **res}
            )
    for vocab in (32_768, 65_536, 131_072, 262_144):
        shape = dict(base, vocab=vocab)
        for method in ("reference", "chunked"):
            res = run_one("stats", method, shape, 128, args.device, args.dtype, 2, args.timeout)
            out.append({"sweep": "vocab", "tokens": 128, "vocab": vocab, "method": method, **res})
            checkpoint()
            _print_row({"workload": "sweep-V", "shape": f"V={vocab}", "method": method, "tokens": 128, **res})
    return out


def _add_ratios(rows: list[dict]) -> None:
    floors = {(r["workload"], r["shape"]): r for r in rows if r["method"] == "floor" and "error" not in r}
    refs = {(r["workload"], r["shape"]): r for r in rows if r["method"] == "reference" and "error" not in r}
    for r in rows:
        if "error" not in r:
            r["overhead_bytes"] = r.get("working_set_bytes", r["peak_above_inputs_bytes"] - r["grad_bytes"])
            r["overhead_vs_inputs_and_grads"] = r["overhead_bytes"] / (r["input_bytes"] + r["grad_bytes"])
    for r in rows:
        if "error" in r:
            continue
        floor = floors.get((r["workload"], r["shape"]))
        if floor:
            r["time_vs_floor"] = r["time_s"] / floor["time_s"]
            r["memory_vs_floor"] = r["peak_above_inputs_bytes"] / max(floor["peak_above_inputs_bytes"], 1)
        ref = refs.get((r["workload"], r["shape"]))
        if ref:
            r["peak_vs_reference"] = r["peak_above_inputs_bytes"] / max(ref["peak_above_inputs_bytes"], 1)
            r["overhead_vs_reference"] = max(r["overhead_bytes"], 1) / max(ref["overhead_bytes"], 1)


def _print_row(r: dict) -> None:
    if "error" in r:
        print(
            f"{r['workload']:8s} {str(r['shape']):8s} {r['method']:20s} N={r['tokens']:<5d} ERROR {r['error']}",
            flush=True,
        )
    else:
        rss = r.get("rss_peak_above_inputs_bytes")
        print(
            f"{r['workload']:8s} {str(r['shape']):8s} {r['method']:20s} N={r['tokens']:<5d} "
            f"{r['time_s'] * 1e3:10.1f} ms  peak+{r['peak_above_inputs_bytes'] / 2**20:9.1f} MiB "
            f"(working set {r.get('working_set_bytes', 0) / 2**20:7.1f} MiB"
            + (f", RSS +{rss / 2**20:.0f} MiB)" if rss is not None else ")"),
            flush=True,
        )


def markdown(result: dict) -> str:
    mib = 2**20
    lines = [
        f"## Kernel benchmark: {result['device']}, {result['date']}, {result['dtype']}",
        "",
        provenance_line(result["provenance"]),
        "",
        "Time: median forward+backward. Peak: tensor memory allocated above the inputs (CPU: the "
        "profiler's allocation events; CUDA: the allocator), including the gradient buffers. Working set: "
        "the most bytes live at once leaving out the returned gradient buffers (CPU: tracked over the "
        "whole run; CUDA: peak minus gradients). RSS: the "
        "process's resident-set peak above the inputs, a second opinion (+-100 MiB with allocator reuse). "
        "Ratios are to the matmul floor of the same workload and shape, measured in the same run.",
        "",
        "| workload | shape | N | method | time (ms) | × floor | peak (MiB) | working set (MiB) | "
        "RSS peak (MiB) | peak × reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['workload']} | {r['shape']} | {r['tokens']} | {r['method']} | error: "
                f"{r['error'][:60]} | | | | | |"
            )
            continue
        rss = r.get("rss_peak_above_inputs_bytes")
        lines.append(
            f"| {r['workload']} | {r['shape']} | {r['tokens']} | {r['method']} | {r['time_s'] * 1e3:.1f} | "
            f"{r.get('time_vs_floor', float('nan')):.2f} | {r['peak_above_inputs_bytes'] / mib:.0f} | "
            f"{r['overhead_bytes'] / mib:.0f} | {'' if rss is None else f'{rss / mib:.0f}'} | "
            f"{r.get('peak_vs_reference', float('nan')):.2f} |"
        )
    if result["sweeps"]:
        lines += [
            "",
            "### Scaling sweeps (stats workload, D = 1024)",
            "",
            "| sweep | N | V | method | time (ms) | peak above inputs (MiB) | working set (MiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["sweeps"]:
            if "error" not in r:
                lines.append(
                    f"| {r['sweep']} | {r['tokens']} | {r['vocab']} | {r['method']} | "
                    f"{r['time_s'] * 1e3:.1f} | {r['peak_above_inputs_bytes'] / mib:.0f} | "
                    f"{r.get('working_set_bytes', r['peak_above_inputs_bytes'] - r['grad_bytes']) / mib:.0f} |"
                )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, sweep, key in ((axes[0], "tokens", "tokens"), (axes[1], "vocab", "vocab")):
        for method in ("reference", "chunked"):
            pts = [
                (r[key], r.get("working_set_bytes", r["peak_above_inputs_bytes"] - r["grad_bytes"]) / 2**20)
                for r in result["sweeps"]
                if r["sweep"] == sweep and r["method"] == method and "error" not in r
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(
            xlabel=key,
            ylabel="working set beyond inputs and gradients (MiB)",
            xscale="log",
            title=f"extra memory vs {key} (D = 1024)",
        )
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"fire-opd token statistics, {result['device']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: a smoke test")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--workloads", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--no-sweeps", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the results files (several runs on one day)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results; --quick writes nothing unless given)",
    )
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.tokens = args.tokens or (32 if args.quick else (4096 if args.device.startswith("cuda") else 128))
    args.repeats = args.repeats or (1 if args.quick else 3)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    stem = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{device_name(args.device)}-{_dt.date.today().isoformat()}{'-' + args.tag if args.tag else ''}"

    def save(result: dict, final: bool = False) -> None:
        if stem is None:
            return
        result_file(stem, ".json").write_text(json.dumps({**result, "complete": final}, indent=1))
        if final:
            result_file(stem, ".md").write_text(markdown(result))
            if result["sweeps"]:
                plot(result, result_file(stem, ".png"))

    result = run_suite(args, checkpoint=save)
    save(result, final=True)
    failed = [r for r in result["rows"] if "error" in r and r["method"] != "reference_compiled"]
    print()
    print(markdown(result))
    if stem is not None:
        print(f"results: {stem}.json / .md / .png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
