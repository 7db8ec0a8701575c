"""Forward-kernel tiles for Blackwell, compiled ahead of time: spill bytes of the three heaviest
16-bit forward variants under a few (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages), for one arch.

    PYTHONPATH=<a folder holding one Triton release> python sweep_forward_tiles.py 100 >> sweep_forward_tiles.txt

(`benchmarks/compile_matrix.py` installs the releases into such folders.) Kept beside its output as
the starting point for a Blackwell tile; no GPU has timed any of them.
"""

import dataclasses
import sys
from concurrent.futures import ProcessPoolExecutor

import triton

from fire_kernels import compile_report as c

HEAVIEST = ("teacher+reverse_kl+head", "jsd+head", "teacher+forward_kl")
CONFIGS = [
    (64, 64, 64, 8, 2),  # the sm_80 / sm_90 default
    (64, 64, 32, 8, 2),
    (64, 32, 64, 8, 2),
    (32, 64, 64, 8, 2),
    (64, 64, 64, 4, 2),
    (64, 64, 64, 8, 1),
    (32, 64, 32, 4, 2),
    (64, 64, 32, 4, 2),
]

if __name__ == "__main__":
    arch = int(sys.argv[1])
    forward = ("_token_stats_fwd_kernel", "_jsd_fwd_kernel")
    bases = [v for v in c.variants(("bf16",)) if v.kernel in forward and v.variant in HEAVIEST]
    jobs = []
    for base in bases:
        for block_n, block_v, block_d, warps, stages in CONFIGS:
            tiles = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d}
            name = f"{base.variant}/{block_n}x{block_v}x{block_d}w{warps}s{stages}"
            variant = dataclasses.replace(
                base, variant=name, constexprs={**base.constexprs, **tiles}, num_warps=warps, num_stages=stages
            )
            jobs.append((variant, arch))
    with ProcessPoolExecutor(2) as pool:
        for r in pool.map(c.compile_variant, jobs):
            print(triton.__version__, f"sm_{r.arch}", r.variant, r.registers, r.spill_bytes, r.error[:60])
