"""The backends behind fire_kernels' public API: `triton_token_stats` (fused Triton kernels),
`chunked` (torch matmul tiles; on CUDA cuBLAS tiles folded by `tile_fold`'s Triton kernels) and
`_row_stats` (the per-row merge and finalize every backend shares). `fire_kernels.reference` is
the oracle."""
