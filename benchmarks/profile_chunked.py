"""Where the chunked statistics' time goes beyond the matrix products, by operator.

    python benchmarks/profile_chunked.py [--tokens 256] [--repeats 3]

One call of the full statistics (both models' log-probs and entropies, the reverse KL, with
gradient) at V = 151,936, D = 256 / 384, fp32, on the CPU, under PyTorch's profiler after a
warm-up: self CPU time per operator, the products (mm / addmm / bmm) against everything else
(the softmax passes over each tile (exp, the row dot products as bmm, the in-place arithmetic),
the temporaries' allocation, the row bookkeeping). The profiler adds its own per-operator cost,
so the share of everything else reads higher here than in a timed side-by-side run.
Results: benchmarks/results/profile-chunked-<device>-<date>.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# the matrix products a bounded implementation cannot avoid (aten::bmm is `_row_dot`'s per-row
# dot products over a tile, part of the softmax passes, not of the floor)
PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fire_kernels import teacher_student_stats

    g = torch.Generator().manual_seed(0)
    n, vocab, d_s, d_t = args.tokens, args.vocab, 256, 384
    hidden = (torch.randn(n, d_s, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(vocab, d_s, generator=g) * 0.05).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(n, d_t, generator=g) * 0.5, torch.randn(vocab, d_t, generator=g) * 0.05
    targets = torch.randint(0, vocab, (n,), generator=g)
    c = torch.rand(n, generator=g)

    def call():
        stats = teacher_student_stats(
            hidden, weight, teacher_hidden, teacher_weight, targets, divergence="reverse_kl", backend="chunked"
        )
        loss = (c * (stats.student_log_prob + stats.student_entropy + stats.divergence)).sum()
        loss.backward()
        hidden.grad = weight.grad = None

    call()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            call()
    self_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        self_us[event.key] += event.self_cpu_time_total
        calls[event.key] += event.count
    total = sum(self_us.values())
    products = sum(v for k, v in self_us.items() if k in PRODUCTS)
    lines = [
        f"Chunked statistics + reverse KL, forward + backward, N = {n}, V = {vocab:,}, D = {d_s} / {d_t}, fp32, "
        f"{torch.get_num_threads()} threads; self CPU time over {args.repeats} calls after a warm-up",
        "",
        f"products (mm / addmm): {products / total:.1%} of the time; everything else: "
        f"{(total - products) / total:.1%} (products x {total / products:.3f})",
        "",
        "| operator | calls | self time (ms per call) | share |",
        "|---|---|---|---|",
    ]
    for key, us in sorted(self_us.items(), key=lambda kv: -kv[1])[:20]:
        lines.append(f"| {key} | {calls[key] // args.repeats} | {us / 1e3 / args.repeats:.1f} | {us / total:.1%} |")
    table = "\n".join(lines)
    print(table)
    from _results import device_label, write_results

    rows = [{"op": k, "self_us": v, "calls": calls[k]} for k, v in self_us.items()]
    write_results(args.out, "profile-chunked", "Where the chunked statistics' time goes", rows, table, device_label())
    return 0


if __name__ == "__main__":
    sys.exit(main())
