"""Vocabulary-parallel statistics, 1 vs K gloo processes on this CPU: lm_head memory per rank, time
and bytes communicated for one forward + backward.

    python benchmarks/bench_vocab_parallel.py [--processes 1 2] [--tokens 512] [--vocab 151936] [--hidden 512]

The call is the full_vocab objective's: `teacher_student_stats(divergence="reverse_kl")` on the
chunked backend, for N tokens of a student and a teacher that share a V-row vocabulary, then a
backward through the student log-prob, entropy and divergence. One process holds both lm_heads
whole (no process group); with K processes each holds V / K rows of each, the full hidden states
and the global targets (`vocab_process_group`). Every process runs one torch thread.

Per process the table gives: the bytes of its lm_head shards (student + teacher weights) and of
the student weight's gradient; the tensor peak of the call (PyTorch profiler allocations, beyond
the inputs: the gradients, the hidden-state gradient and the bounded logit tiles); the median
time of `--repeats` calls; and the bytes it hands to all-reduce, measured, next to the formula:
forward 4 (2N + 7N) bytes (the per-row maxima of both models, then the merged sums S, A, z_y of
both and the KL cross term), backward 4 N D bytes (the shard's part of dL/dh). A ring all-reduce
of b bytes moves about 2 (K - 1) / K b bytes in and out of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

from _results import device_label, write_results  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(tokens: int, vocab: int, hidden: int):
    gen = torch.Generator().manual_seed(0)
    s_h = torch.randn(tokens, hidden, generator=gen)
    s_w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    t_h = torch.randn(tokens, hidden, generator=gen)
    t_w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    return s_h, s_w, t_h, t_w, targets


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    from _memory import tensor_peak_bytes

    from fire_kernels import teacher_student_stats

    torch.set_num_threads(1)
    group = None
    lo, hi = 0, args.vocab
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        group = dist.group.WORLD
        lo, hi = rank * args.vocab // world, (rank + 1) * args.vocab // world
    s_h, s_w, t_h, t_w, targets = _inputs(args.tokens, args.vocab, args.hidden)
    s_w, t_w = s_w[lo:hi].clone(), t_w[lo:hi].clone()  # this rank's shards only
    s_h.requires_grad_(True)
    s_w.requires_grad_(True)

    sent = {"bytes": 0}
    original = dist.all_reduce

    def counting(tensor, *a, **k):
        sent["bytes"] += tensor.numel() * tensor.element_size()
        return original(tensor, *a, **k)

    def step(count: dict | None = None):
        s_h.grad = s_w.grad = None
        if count is not None:
            dist.all_reduce = counting
        stats = teacher_student_stats(
            s_h, s_w, t_h, t_w, targets, divergence="reverse_kl", backend="chunked", vocab_process_group=group
        )
        forward = sent["bytes"]
        (stats.student_log_prob.sum() + 0.1 * stats.student_entropy.sum() + stats.divergence.sum()).backward()
        dist.all_reduce = original
        if count is not None:
            count.update(forward=forward, backward=sent["bytes"] - forward)
        return s_w.grad

    step()  # warm-up
    comm: dict = {}
    step(comm)
    peak, _ = tensor_peak_bytes(step)
    times = []
    for _ in range(args.repeats):
        if group is not None:
            dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    row = {
        "processes": world,
        "rank": rank,
        "vocab_rows": hi - lo,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "lm_head_bytes": (s_w.numel() + t_w.numel()) * 4,
        "weight_grad_bytes": s_w.numel() * 4,
        "call_peak_bytes": peak,
        "time_s": statistics.median(times),
        "forward_comm_bytes": comm.get("forward", 0),
        "backward_comm_bytes": comm.get("backward", 0),
    }
    Path(out_dir, f"{world}-{rank}.json").write_text(json.dumps(row))
    if group is not None:  # a barrier first: a bare destroy can hang on gloo (pytorch/pytorch#75097)
        from fire_opd.parallel.distributed import teardown

        teardown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.processes:
            mp.spawn(_worker, args=(k, _free_port(), args, tmp), nprocs=k, join=True)
            rank0 = json.loads(Path(tmp, f"{k}-0.json").read_text())
            rank0["time_s"] = max(json.loads(Path(tmp, f"{k}-{r}.json").read_text())["time_s"] for r in range(k))
            rows.append(rank0)
            print(rank0, flush=True)
    n, d = args.tokens, args.hidden
    mib = 2**20
    lines = [
        f"N = {n} tokens, V = {args.vocab:,}, D = {d} (student and teacher), fp32, chunked backend, "
        "reverse KL + log-prob + entropy, forward and backward; figures for rank 0, time the slowest rank's.",
        "",
        "| processes | vocab rows per process | lm_heads per process (MiB) | weight gradient per process (MiB) | "
        "call tensor peak per process (MiB) | time (s) | forward all-reduce (bytes; formula 36 N) | "
        "backward all-reduce (MiB; formula 4 N D) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['vocab_rows']:,} | {r['lm_head_bytes'] / mib:.1f} | "
            f"{r['weight_grad_bytes'] / mib:.1f} | {r['call_peak_bytes'] / mib:.1f} | {r['time_s']:.3f} | "
            f"{r['forward_comm_bytes']:,} ({36 * n:,} when K > 1) | {r['backward_comm_bytes'] / mib:.2f} "
            f"({4 * n * d / mib:.2f} when K > 1) |"
        )
    table = "\n".join(lines)
    print(table)
    write_results(args.out, "vocab-parallel", "Vocabulary-parallel statistics (gloo)", rows, table, device_label())
    return 0


if __name__ == "__main__":
    sys.exit(main())
