"""Cost model of the two GPU paths for one teacher-student statistics step (forward + backward,
reverse KL), printed as the markdown table in csrc_notes/tile_fold.md.

    python benchmarks/gpu_cost_model.py [--tokens 8192]

fused   `backend="triton"`: Triton tiles of BLOCK_N x BLOCK_V (x BLOCK_D) compute the products on
        chip; the backward adds dz @ W into dh and dz^T @ h into dW with fp32 atomics.
fold    `backend="chunked"` on CUDA (`fire_kernels.backends.tile_fold`): cuBLAS writes each fp32 logit tile
        to HBM, one Triton fold reads it; the backward writes dL/dr in bf16 and cuBLAS reads it twice.

Both do the same matrix products: forward 2 N V (D_s + D_t) flops, backward the recompute again
plus 2 x 2 N V D_s. What differs is the traffic beyond the products:

    fused   atomics   N V D_s 4 B (1 / BLOCK_N + 1 / BLOCK_V)         (backward, fp32 read-modify-write in L2)
            operands  N V D 2 B (1 / BLOCK_N + 1 / BLOCK_V) per model and pass (through L2; HBM only on misses)
    fold    tiles     8 B per logit and model forward (write + read fp32), 16 + 6 B per logit backward
                      (z and u written and read, dL/dr written in bf16 and read by two GEMMs)

Times are estimates on an H100 SXM (bf16 dense 989 TFLOP/s peak, HBM 3.35 TB/s), with cuBLAS at
70 % of peak and the fused Triton tiles at an assumed 50 % (64 x 64 x 64 tiles, 2 stages, never
measured); atomics are charged at HBM bandwidth, an optimistic bound for L2 fp32 atomics. No GPU
has checked these numbers: they set `auto`'s rule until one does.
"""

from __future__ import annotations

import argparse

SHAPES = {  # vocab, student D, teacher D (the benchmark's model pairs)
    "qwen3 (4B <- 8B)": (151_936, 2560, 4096),
    "llama3 (8B <- 8B)": (128_256, 4096, 4096),
    "gemma2 (2B <- 2B)": (256_000, 2304, 2304),
}
PEAK_FLOPS = 989e12
CUBLAS_EFFICIENCY = 0.70
FUSED_EFFICIENCY = 0.50
HBM_BYTES_PER_S = 3.35e12
BLOCK_N = BLOCK_V = 64


def model(vocab: int, d_s: int, d_t: int, n: int) -> dict:
    logits = n * vocab
    fwd_flops = 2 * logits * (d_s + d_t)
    bwd_flops = fwd_flops + 2 * 2 * logits * d_s
    tile_factor = 1 / BLOCK_N + 1 / BLOCK_V
    atomics = logits * d_s * 4 * tile_factor
    operands = logits * 2 * tile_factor * ((d_s + d_t) * 2 + d_s)  # fwd + recompute of both, + dh/dW loads
    fold_bytes = logits * (2 * 8 + 16 + 6)
    products_cublas = (fwd_flops + bwd_flops) / (PEAK_FLOPS * CUBLAS_EFFICIENCY)
    products_fused = (fwd_flops + bwd_flops) / (PEAK_FLOPS * FUSED_EFFICIENCY)
    return {
        "tflop": (fwd_flops + bwd_flops) / 1e12,
        "atomics_gb": atomics / 1e9,
        "operands_gb": operands / 1e9,
        "fold_gb": fold_bytes / 1e9,
        "fused_ms": 1e3 * (products_fused + atomics / HBM_BYTES_PER_S),
        "fold_ms": 1e3 * (products_cublas + fold_bytes / HBM_BYTES_PER_S),
        "products_ms": 1e3 * products_cublas,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    print(f"N = {args.tokens}, H100 SXM estimates (see the docstring for every assumption)\n")
    print(
        "| model pair (V; D_s / D_t) | products (TFLOP) | fused: atomics (GB) | fused: operand loads via L2 (GB) "
        "| fold: tile traffic (GB) | cuBLAS products alone (ms) | fused est. (ms) | fold est. (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (vocab, d_s, d_t) in SHAPES.items():
        m = model(vocab, d_s, d_t, args.tokens)
        print(
            f"| {name} ({vocab:,}; {d_s} / {d_t}) | {m['tflop']:.1f} | {m['atomics_gb']:.0f} | "
            f"{m['operands_gb']:.0f} | {m['fold_gb']:.0f} | {m['products_ms']:.0f} | {m['fused_ms']:.0f} | "
            f"{m['fold_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
