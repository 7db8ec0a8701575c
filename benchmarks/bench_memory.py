"""Memory of the chunked statistics and of the fused updates, counted from tensor allocations.

    python benchmarks/bench_memory.py            # V = 151,936, D = 256 student / 384 teacher, fp32, CPU
    python benchmarks/bench_memory.py --quick    # small shapes (make test runs it: the script cannot rot)

Two tables, each row one call (forward + backward) measured by the profiler's allocation events
(`_memory.tensor_peak_bytes`):

  statistics  the chunked backend's working set (the most bytes live at once, leaving out the
              gradient buffers the call returns) for log-probs and entropies alone and with each
              divergence, at N = 1024 and 4096: the figures the docs quote.
  update      the peak above the inputs of each fused update (the sampled objective's log-prob
              update, the dense objective's reverse-KL update) against the materialized path
              (autograd through [N, V] logits) over N: no fused path should peak above the
              materialized one at any N.

Results: benchmarks/results/memory-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _memory import tensor_peak_bytes  # noqa: E402

MIB = 2**20


def _inputs(n: int, vocab: int, d_s: int, d_t: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d_s, generator=g) * 0.5,
        torch.randn(vocab, d_s, generator=g) * 0.05,
        torch.randn(n, d_t, generator=g) * 0.5,
        torch.randn(vocab, d_t, generator=g) * 0.05,
        torch.randint(0, vocab, (n,), generator=g),
        torch.rand(n, generator=g),
    )


def statistics_row(divergence: str, n: int, vocab: int, d_s: int, d_t: int) -> dict:
    """The chunked statistics' forward + backward: student log-prob and entropy, and the
    divergence with gradient when one is asked."""
    from fire_kernels import teacher_student_stats, token_stats

    hidden, weight, teacher_hidden, teacher_weight, targets, c = _inputs(n, vocab, d_s, d_t)
    hidden.requires_grad_()
    weight.requires_grad_()

    def call():
        if divergence == "none":
            log_prob, entropy = token_stats(hidden, weight, targets, backend="chunked")
            loss = (c * log_prob).sum() + (c * entropy).sum()
        else:
            stats = teacher_student_stats(
                hidden, weight, teacher_hidden, teacher_weight, targets, divergence=divergence, backend="chunked"
            )
            loss = (c * stats.student_log_prob).sum() + (c * stats.student_entropy).sum()
            loss = loss + (c * stats.divergence).sum()
        loss.backward()
        return hidden.grad, weight.grad

    peak, working = tensor_peak_bytes(call)
    return {"table": "statistics", "divergence": divergence, "n": n, "peak": peak, "working_set": working}


def update_row(objective: str, method: str, n: int, vocab: int, d_s: int, d_t: int) -> dict:
    """One fused update (`fire_kernels.fused_update`) or the materialized path's autograd."""
    from fire_kernels import teacher_student_stats, token_stats
    from fire_kernels.fused_update import linear_divergence_update, linear_log_prob_update

    hidden, weight, teacher_hidden, teacher_weight, targets, c = _inputs(n, vocab, d_s, d_t)

    def call():
        if method == "fused" and objective == "sampled":
            update = linear_log_prob_update(
                hidden, weight, targets, lambda lp, rows: ((c[rows] * lp).sum(), c[rows]), backend="chunked"
            )
            return update.grad_hidden, update.grad_weight
        if method == "fused":
            update = linear_divergence_update(
                hidden, weight, teacher_hidden, teacher_weight, targets, c, divergence="reverse_kl", backend="chunked"
            )
            return update.grad_hidden, update.grad_weight
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        if objective == "sampled":
            loss = (c * token_stats(h, w, targets, backend="reference")[0]).sum()
        else:
            stats = teacher_student_stats(
                h, w, teacher_hidden, teacher_weight, targets, divergence="reverse_kl", backend="reference"
            )
            loss = (c * stats.divergence).sum()
        loss.backward()
        return h.grad, w.grad

    peak, working = tensor_peak_bytes(call)
    return {"table": "update", "objective": objective, "method": method, "n": n, "peak": peak, "working_set": working}


def markdown(rows: list[dict], shape: str) -> str:
    lines = [
        f"Chunked statistics, forward + backward ({shape}): working set and peak (MiB)",
        "",
        "| statistics | N | working set | peak |",
        "|---|---|---|---|",
    ]
    for r in (r for r in rows if r["table"] == "statistics"):
        what = "log-prob + entropy" if r["divergence"] == "none" else f"+ {r['divergence']}"
        lines.append(f"| {what} | {r['n']} | {r['working_set'] / MIB:.1f} | {r['peak'] / MIB:.1f} |")
    lines += [
        "",
        f"Fused updates against the materialized path ({shape}): peak above the inputs (MiB)",
        "",
        "| objective | N | fused | materialized | fused / materialized |",
        "|---|---|---|---|---|",
    ]
    updates = {(r["objective"], r["n"], r["method"]): r["peak"] for r in rows if r["table"] == "update"}
    for objective, n in sorted({(o, n) for o, n, _ in updates}):
        fused, ref = updates[(objective, n, "fused")], updates[(objective, n, "materialized")]
        lines.append(f"| {objective} | {n} | {fused / MIB:.1f} | {ref / MIB:.1f} | {fused / ref:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, nothing written")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    if args.quick:
        vocab, d_s, d_t, stat_ns, update_ns = 4099, 32, 48, (64, 300), (16, 300)
    else:
        vocab, d_s, d_t, stat_ns, update_ns = 151_936, 256, 384, (1024, 4096), (16, 64, 128, 384, 1024, 2048)
    shape = f"V = {vocab:,}, D = {d_s} / {d_t}, fp32, CPU"
    rows = []
    for divergence in ("none", "reverse_kl", "forward_kl", "jsd"):
        for n in stat_ns:
            rows.append(statistics_row(divergence, n, vocab, d_s, d_t))
            print(rows[-1], flush=True)
    for objective in ("sampled", "full_vocab"):
        for n in update_ns:
            for method in ("fused", "materialized"):
                rows.append(update_row(objective, method, n, vocab, d_s, d_t))
                print(rows[-1], flush=True)
    table = markdown(rows, shape)
    print(table)
    # "above" allows 1 %: at a few tokens both paths hold the same [N, V] and [V, D] buffers, and
    # they differ by the O(N) row vectors each keeps
    materialized = {(r["objective"], r["n"]): r["peak"] for r in rows if r.get("method") == "materialized"}
    worse = [
        r for r in rows if r.get("method") == "fused" and r["peak"] > 1.01 * materialized[(r["objective"], r["n"])]
    ]
    for r in worse:
        print(f"fused {r['objective']} update peaks above the materialized path at N = {r['n']}", file=sys.stderr)
    out = args.out if args.out is not None else (None if args.quick else ROOT / "benchmarks" / "results")
    if out is not None:
        from _results import device_label, write_results

        write_results(out, "memory", "Memory of the statistics and the fused updates", rows, table, device_label(False))
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
