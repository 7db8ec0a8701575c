"""The fp32 backward kernel's spills with a 32- or 16-wide D tile, for every divergence with and
without a head, under the Triton first on the path. One JSON line per compile.

    PYTHONPATH=<a folder holding one Triton release> python probe_bwd_block_d.py >> probe_bwd_block_d.jsonl

(`benchmarks/compile_matrix.py` installs the releases into such folders.) Kept beside its output
as the measurement behind `FP32_HEAD_CONFIG` in fire_kernels/backends/triton_token_stats.py.
"""

import dataclasses
import json
from concurrent.futures import ProcessPoolExecutor

import triton

from fire_kernels import compile_report as c

if __name__ == "__main__":
    base = next(
        v for v in c.variants(("fp32",)) if v.kernel == "_token_stats_bwd_kernel" and v.variant == "reverse_kl+head"
    )
    jobs = []
    for div, name in c.DIVERGENCE_NAMES.items():
        for head in (False, True):
            for block_d in (32, 16):
                heads = dict.fromkeys(("S_HAS_BIAS", "S_HAS_SOFTCAP", "T_HAS_BIAS", "T_HAS_SOFTCAP"), head)
                const = {**base.constexprs, **heads, "DIVERGENCE": div, "COMPUTE_DB": head, "BLOCK_D": block_d}
                variant = dataclasses.replace(
                    base, variant=f"{name}{'+head' if head else ''}/bd{block_d}", constexprs=const
                )
                jobs += [(variant, arch) for arch in (80, 90)]
    with ProcessPoolExecutor(2) as pool:
        for r in pool.map(c.compile_variant, jobs):
            row = {"triton": triton.__version__, "variant": r.variant, "arch": r.arch}
            print(json.dumps({**row, "reg": r.registers, "spill": r.spill_bytes, "err": r.error[:80]}))
