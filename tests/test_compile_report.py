"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without spilling.

The report runs in a subprocess: this test session imported triton with TRITON_INTERPRET=1,
under which @triton.jit functions are interpreted and cannot be compiled."""

import faulthandler
import json
import os
import subprocess
import sys


def test_every_kernel_compiles_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fire_kernels.compile_report", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = json.loads(proc.stdout)
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "_token_stats_fwd_kernel",
        "_jsd_fwd_kernel",
        "_token_stats_bwd_kernel",
        "_fire_weights_kernel",
        "_fold_stats_kernel",
        "_fold_jsd_kernel",
        "_fold_grad_kernel",
    }
    assert any(r["variant"].endswith("+head") for r in results)  # bias + soft-cap variants are built too
    assert {r["arch"] for r in results} == {80, 90}
    assert {r["dtype"] for r in results} >= {"bf16", "fp16", "fp32"}
    failed = [
        f"{r['kernel']}/{r['variant']}/{r['dtype']}/sm_{r['arch']}: {r['error'] or r['spill_bytes']}"
        for r in results
        if not r["ok"] or r["spill_bytes"] != 0
    ]
    assert not failed, "\n".join(failed)
    assert all(0 < r["registers"] <= 255 for r in results)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_report_builds_the_compiler_input_of_old_and_new_triton(monkeypatch):
    """Triton 3.3+ takes the whole signature and `constexprs=`; 3.0-3.2 take the runtime arguments'
    signature and `constants=` (benchmarks/compile_matrix.py runs the report under both)."""
    from fire_kernels import compile_report

    variant = next(v for v in compile_report.variants(("bf16",)) if v.kernel == "_token_stats_bwd_kernel")
    seen = {}

    class NewSource:
        def __init__(self, fn, signature, constexprs=None, attrs=None):
            seen.update(signature=signature, constexprs=constexprs)

    class OldSource:
        def __init__(self, fn, signature, constants=None, attrs=None):
            seen.update(signature=signature, constants=constants)

    monkeypatch.setattr(compile_report, "ASTSource", NewSource)
    compile_report._ast_source(variant)
    assert seen["signature"] == variant.signature and seen["constexprs"] == variant.constexprs
    assert "constexpr" in seen["signature"].values()

    seen.clear()
    monkeypatch.setattr(compile_report, "ASTSource", OldSource)
    compile_report._ast_source(variant)
    assert seen["constants"] == variant.constexprs
    assert set(seen["signature"]) == set(variant.signature) - set(variant.constexprs)
    assert "constexpr" not in seen["signature"].values()


def _compile_or_abort(job):
    """A stand-in for compile_variant (module level: the pool pickles it by name) that dies the way
    a compiler assertion does on the backward kernel."""
    from fire_kernels.compile_report import CompileResult

    variant, arch = job
    if variant.kernel == "_token_stats_bwd_kernel":
        faulthandler.disable()  # pytest's traceback dump would only add noise to the log
        os.abort()
    return CompileResult(variant.kernel, variant.variant, variant.dtype, arch, True, 1, 0, 0)


def _compiled_alone(job):
    from fire_kernels.compile_report import CompileResult

    variant, arch = job
    return CompileResult(variant.kernel, variant.variant, variant.dtype, arch, False, error="alone")


def test_a_compile_that_aborts_its_process_is_reported_not_lost(monkeypatch):
    """A compiler assertion kills the worker (SIGABRT, no exception) and breaks the pool: the lost
    jobs are run again one process each, and the report keeps every variant in order. Needs the
    fork start method (the patched function reaches the workers by copy)."""
    from fire_kernels import compile_report

    monkeypatch.setattr(compile_report, "compile_variant", _compile_or_abort)
    monkeypatch.setattr(compile_report, "compile_alone", _compiled_alone)
    results = compile_report.run_report(archs=(80,), dtypes=("fp32",), workers=2)
    expected = [(v.kernel, v.variant) for v in compile_report.variants(("fp32",))]
    assert [(r.kernel, r.variant) for r in results] == expected
    assert all(r.error == "alone" for r in results if r.kernel == "_token_stats_bwd_kernel")
    assert all(r.ok or r.error == "alone" for r in results)


def test_a_process_that_dies_names_its_exit_and_last_line(monkeypatch):
    from fire_kernels import compile_report

    variant = compile_report.variants(("fp32",))[0]
    monkeypatch.setattr(
        compile_report, "_COMPILE_ALONE", 'import os, sys; print("Assertion `x\' failed.", file=sys.stderr); os.abort()'
    )
    result = compile_report.compile_alone((variant, 90))
    assert not result.ok and (result.kernel, result.arch) == (variant.kernel, 90)
    assert result.error == "compiler process died (exit -6): Assertion `x' failed."
