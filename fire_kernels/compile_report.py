"""Compile every Triton kernel ahead of time for sm_80 and sm_90 and report its resources.

    python -m fire_kernels.compile_report [--arch 80 90] [--dtype bf16 fp16 fp32] [--json]

Needs no GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` produces a
cubin, and the cuobjdump that ships with Triton reads its register count and local-memory
(spill) bytes. Shared memory is Triton's dynamic allocation from the compile metadata.
The exit status is 1 if a kernel fails to compile or spills.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Callable, Optional

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 keeps its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16", "fp32")
DIVERGENCE_NAMES = {0: "none", 1: "reverse_kl", 2: "forward_kl", 3: "jsd"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class KernelVariant:
    """One specialization of one kernel: its name, the kernel's getter, signature and constexprs."""

    kernel: str
    variant: str
    dtype: str
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int


@dataclass
class CompileResult:
    kernel: str
    variant: str
    dtype: str
    arch: int
    ok: bool
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    error: str = ""

    @property
    def status(self) -> str:
        """ "clean", "spills" (compiled, with local-memory bytes) or "failed"."""
        return "failed" if not self.ok else ("spills" if self.spill_bytes else "clean")


def _kernel_fn(name: str) -> Callable:
    from fire_kernels import fire_weights
    from fire_kernels.backends import tile_fold, triton_token_stats

    return {
        "_fold_stats_kernel": tile_fold._fold_stats_kernel,
        "_fold_jsd_kernel": tile_fold._fold_jsd_kernel,
        "_fold_grad_kernel": tile_fold._fold_grad_kernel,
        "_token_stats_fwd_kernel": triton_token_stats._token_stats_fwd_kernel,
        "_jsd_fwd_kernel": triton_token_stats._jsd_fwd_kernel,
        "_token_stats_bwd_kernel": triton_token_stats._token_stats_bwd_kernel,
        "_fire_weights_kernel": fire_weights._fire_weights_kernel,
    }[name]


def _in_kernel_order(kernel: str, signature: dict) -> dict:
    """The signature with its keys in the kernel's parameter order (and every parameter present)."""
    names = _kernel_fn(kernel).arg_names  # type: ignore[attr-defined]  # a triton JITFunction
    missing = set(names) ^ set(signature)
    if missing:
        raise ValueError(f"{kernel}: signature and parameters differ in {sorted(missing)}")
    return {name: signature[name] for name in names}


def _heads(student: bool, teacher: bool) -> tuple[dict, dict]:
    """(signature, constexprs) of the head arguments: with bias and soft-cap, or plain."""
    sig = {"s_scale": "fp32", "s_softcap": "fp32", "t_scale": "fp32", "t_softcap": "fp32"}
    const = {"S_HAS_BIAS": student, "S_HAS_SOFTCAP": student, "T_HAS_BIAS": teacher, "T_HAS_SOFTCAP": teacher}
    return sig, const


def _model_args(prefix: str) -> dict:
    return {
        f"{prefix}_stride_hn": "i32",
        f"{prefix}_stride_hd": "i32",
        f"{prefix}_stride_wv": "i32",
        f"{prefix}_stride_wd": "i32",
    }


def variants(dtypes=DTYPES) -> list[KernelVariant]:
    """Every kernel specialization the package launches, per dtype."""
    from fire_kernels.backends.triton_token_stats import default_config
    from fire_kernels.fire_weights import FIRE_WEIGHTS_BLOCK

    out: list[KernelVariant] = []
    for dt in dtypes:
        # The configurations the host launches per dtype (and, in backward, per head).
        cfg = default_config(TORCH_DTYPES[dt])
        tiles = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d}
        p = f"*{dt}"
        common = {"N": "i32", "V": "i32", "D_S": "i32", "D_T": "i32", **_model_args("s"), **_model_args("t")}
        precision = "ieee"

        def add(kernel, name, sig, const, warps):
            sig = _in_kernel_order(kernel, {**sig, **{k: "constexpr" for k in const}})
            out.append(KernelVariant(kernel, name, dt, sig, const, warps, cfg.num_stages))

        # Plain heads for every variant; "+head" adds a bias and a soft-cap to both models (the
        # heaviest head: one more load per tile, a tanh, and in backward its Jacobian and db).
        forward_cases = [(False, 0), (True, 0), (True, 1), (True, 2)]  # (has_teacher, divergence)
        for head, (has_teacher, div) in itertools.product((False, True), forward_cases):
            head_sig, head_const = _heads(head, head)
            sig = {
                "S_HIDDEN": p,
                "S_WEIGHT": p,
                "S_BIAS": p,
                "T_HIDDEN": p,
                "T_WEIGHT": p,
                "T_BIAS": p,
                "TARGETS": "*i64",
                "PARTIALS": "*fp32",
                **common,
                "inv_temp": "fp32",
                "tiles_per_split": "i32",
                **head_sig,
            }
            const = {
                "HAS_TEACHER": has_teacher,
                "DIVERGENCE": div,
                **tiles,
                "DOT_FP32": False,
                "INPUT_PRECISION": precision,
                **head_const,
            }
            name = ("student" if not has_teacher else f"teacher+{DIVERGENCE_NAMES[div]}") + ("+head" if head else "")
            add("_token_stats_fwd_kernel", name, sig, const, cfg.num_warps)
        for head in (False, True):
            head_sig, head_const = _heads(head, head)
            sig = {
                "S_HIDDEN": p,
                "S_WEIGHT": p,
                "S_BIAS": p,
                "T_HIDDEN": p,
                "T_WEIGHT": p,
                "T_BIAS": p,
                "S_LSE": "*fp32",
                "T_LSE": "*fp32",
                "PARTIALS": "*fp32",
                **common,
                "inv_temp": "fp32",
                "tiles_per_split": "i32",
                "log_one_minus_beta": "fp32",
                "log_beta": "fp32",
                **head_sig,
            }
            const = {**tiles, "DOT_FP32": False, "INPUT_PRECISION": precision, **head_const}
            add("_jsd_fwd_kernel", "jsd+head" if head else "jsd", sig, const, cfg.jsd_num_warps)
        for head, div in itertools.product((False, True), DIVERGENCE_NAMES):
            head_sig, head_const = _heads(head, head)
            bwd_cfg = default_config(TORCH_DTYPES[dt], head=head)
            bwd_tiles = {"BLOCK_N": bwd_cfg.bwd_block_n, "BLOCK_V": bwd_cfg.bwd_block_v, "BLOCK_D": bwd_cfg.bwd_block_d}
            sig = {
                "S_HIDDEN": p,
                "S_WEIGHT": p,
                "S_BIAS": p,
                "T_HIDDEN": p,
                "T_WEIGHT": p,
                "T_BIAS": p,
                "TARGETS": "*i64",
                "S_LSE": "*fp32",
                "S_ENT": "*fp32",
                "T_LSE": "*fp32",
                "DIV_AUX": "*fp32",
                "G_LOGPROB": "*fp32",
                "G_ENTROPY": "*fp32",
                "G_DIVERGENCE": "*fp32",
                "GRAD_HIDDEN": "*fp32",
                "GRAD_WEIGHT": "*fp32",
                "GRAD_BIAS": "*fp32",
                **common,
                "inv_temp": "fp32",
                "jsd_beta": "fp32",
                "log_one_minus_beta": "fp32",
                "log_beta": "fp32",
                **head_sig,
            }
            const = {
                "DIVERGENCE": div,
                "COMPUTE_DH": True,
                "COMPUTE_DW": True,
                "COMPUTE_DB": head,
                **bwd_tiles,
                "DOT_FP32": False,
                "INPUT_PRECISION": precision,
                **head_const,
            }
            add(
                "_token_stats_bwd_kernel",
                DIVERGENCE_NAMES[div] + ("+head" if head else ""),
                sig,
                const,
                cfg.bwd_num_warps,
            )
        # Tile folds of the chunked backend on CUDA (tile_fold): fp32 tiles from cuBLAS, the
        # gradient tile written in the parameter dtype, the bias in the parameter dtype.
        from fire_kernels.backends.tile_fold import FOLD_BLOCK_N, FOLD_BLOCK_V, FOLD_NUM_WARPS

        fold_tiles = {"BLOCK_N": FOLD_BLOCK_N, "BLOCK_V": FOLD_BLOCK_V}
        fold_common = {
            "R": "i32",
            "C": "i32",
            "row0": "i32",
            "col_start": "i32",
            "tile_stride": "i32",
            "inv_temp": "fp32",
        }
        for head, (has_teacher, div) in itertools.product((False, True), [(False, 0), (True, 1), (True, 2)]):
            head_sig, head_const = _heads(head, head)
            sig = {
                "Z": "*fp32",
                "U": "*fp32",
                "S_BIAS": p,
                "T_BIAS": p,
                "TARGETS": "*i64",
                "STATE": "*fp32",
                "N": "i32",
                **fold_common,
                **head_sig,
            }
            const = {"HAS_TEACHER": has_teacher, "DIVERGENCE": div, **head_const, **fold_tiles}
            name = ("student" if not has_teacher else f"teacher+{DIVERGENCE_NAMES[div]}") + ("+head" if head else "")
            add("_fold_stats_kernel", name, sig, const, FOLD_NUM_WARPS["stats"])
        for head in (False, True):
            head_sig, head_const = _heads(head, head)
            sig = {
                "Z": "*fp32",
                "U": "*fp32",
                "S_BIAS": p,
                "T_BIAS": p,
                "S_LSE": "*fp32",
                "T_LSE": "*fp32",
                "KL": "*fp32",
                "N": "i32",
                **fold_common,
                **head_sig,
                "log_one_minus_beta": "fp32",
                "log_beta": "fp32",
            }
            add(
                "_fold_jsd_kernel",
                "jsd+head" if head else "jsd",
                sig,
                {**head_const, **fold_tiles},
                FOLD_NUM_WARPS["jsd"],
            )
        for head, div in itertools.product((False, True), DIVERGENCE_NAMES):
            head_sig, head_const = _heads(head, head)
            sig = {
                "Z": "*fp32",
                "U": "*fp32",
                "DR": p,
                "S_BIAS": p,
                "T_BIAS": p,
                "GRAD_BIAS": "*fp32",
                "TARGETS": "*i64",
                "S_LSE": "*fp32",
                "S_ENT": "*fp32",
                "T_LSE": "*fp32",
                "DIV_AUX": "*fp32",
                "G_LOGPROB": "*fp32",
                "G_ENTROPY": "*fp32",
                "G_DIVERGENCE": "*fp32",
                **fold_common,
                **head_sig,
                "jsd_beta": "fp32",
                "log_one_minus_beta": "fp32",
                "log_beta": "fp32",
            }
            const = {"DIVERGENCE": div, "COMPUTE_DB": head, **head_const, **fold_tiles}
            add(
                "_fold_grad_kernel",
                DIVERGENCE_NAMES[div] + ("+head" if head else ""),
                sig,
                const,
                FOLD_NUM_WARPS["grad"],
            )
    # The FiRe weights kernel reads float32 statistics whatever the model dtype: one variant.
    sig = {
        "TEACHER_LOGPROB": "*fp32",
        "TEACHER_ENTROPY": "*fp32",
        "STUDENT_ENTROPY": "*fp32",
        "MASK": "*fp32",
        "WEIGHTS": "*fp32",
        "SEQ_SCORE": "*fp32",
        "ROW_WEIGHT_SUM": "*fp32",
        "ROW_TOKENS": "*fp32",
        "response_len": "i32",
        "inv_max_teacher_entropy": "fp32",
        "inv_max_student_entropy": "fp32",
        "alpha": "fp32",
        "beta": "fp32",
    }
    const = {"BLOCK": FIRE_WEIGHTS_BLOCK}
    out.append(KernelVariant("_fire_weights_kernel", "fp32-stats", "fp32", {**sig, "BLOCK": "constexpr"}, const, 4, 1))
    return out


def _ast_source(variant: KernelVariant) -> ASTSource:
    """The variant as Triton's compiler input. Triton 3.3 and later take the whole signature, the
    constexprs marked "constexpr", and `constexprs=`; Triton 3.0-3.2 take only the runtime
    arguments' signature and `constants=` (both keyed by name)."""
    fn = _kernel_fn(variant.kernel)
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        return ASTSource(fn=fn, signature=variant.signature, constexprs=variant.constexprs)
    runtime_args = {name: kind for name, kind in variant.signature.items() if kind != "constexpr"}
    return ASTSource(fn, runtime_args, constants=variant.constexprs)


_RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_variant(args: tuple[KernelVariant, int]) -> CompileResult:
    variant, arch = args
    res = CompileResult(variant.kernel, variant.variant, variant.dtype, arch, ok=False)
    try:
        src = _ast_source(variant)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            dump = subprocess.run(
                [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
            ).stdout
        finally:
            os.unlink(f.name)
        match = _RESOURCE_RE.search(dump)
        if match is None:
            raise RuntimeError(f"cannot parse cuobjdump output: {dump!r}")
        reg, stack, _static_shared, local = (int(g) for g in match.groups())
        res.registers = reg
        res.spill_bytes = stack + local
        res.shared_bytes = int(compiled.metadata.shared)
        res.ok = True
    except Exception as exc:  # a report, not a crash: every failure is listed
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return res


_COMPILE_ALONE = (
    "import json, sys; from dataclasses import asdict; from fire_kernels import compile_report as c; "
    "v = c.KernelVariant(**json.loads(sys.argv[1])); "
    "print(json.dumps(asdict(c.compile_variant((v, int(sys.argv[2]))))))"
)


def compile_alone(job: tuple[KernelVariant, int]) -> CompileResult:
    """`compile_variant` in a process of its own. A compiler assertion (Triton 3.2 on sm_90, for
    one) aborts the process with no Python exception; this reports it as the variant's failure,
    with the assertion's line, instead of losing the report."""
    variant, arch = job
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_ALONE, json.dumps(asdict(variant)), str(arch)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    if proc.returncode == 0:
        return CompileResult(**json.loads(proc.stdout.strip().splitlines()[-1]))
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    error = f"compiler process died (exit {proc.returncode}): {last}"[:300]
    return CompileResult(variant.kernel, variant.variant, variant.dtype, arch, ok=False, error=error)


def run_report(archs=ARCHS, dtypes=DTYPES, workers: Optional[int] = None) -> list[CompileResult]:
    """Every variant for every arch, `workers` processes at a time. A job whose worker died
    (which breaks the pool and every job pending in it) is run again in a process of its own."""
    jobs = [(v, a) for v in variants(dtypes) for a in archs]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    results: list[Optional[CompileResult]] = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(compile_variant, job) for job in jobs]
        for i, future in enumerate(futures):
            try:
                results[i] = future.result()
            except BrokenProcessPool:
                pass
    missing = [i for i, r in enumerate(results) if r is None]
    with ThreadPoolExecutor(max_workers=workers) as threads:
        for i, result in zip(missing, threads.map(compile_alone, [jobs[i] for i in missing])):
            results[i] = result
    return [r for r in results if r is not None]


def format_table(results: list[CompileResult]) -> str:
    lines = [
        "| kernel | variant | dtype | arch | registers | spill bytes | shared bytes | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        status = {"clean": "ok", "spills": "SPILLS"}.get(r.status, f"FAILED {r.error}")
        lines.append(
            f"| {r.kernel} | {r.variant} | {r.dtype} | sm_{r.arch} | {r.registers} | {r.spill_bytes} | "
            f"{r.shared_bytes} | {status} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    results = run_report(tuple(args.arch), tuple(args.dtype))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        print(f"triton {triton.__version__}; registers and spills from cuobjdump, shared memory from Triton metadata")
        print(format_table(results))
    bad = [r for r in results if r.status != "clean"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
