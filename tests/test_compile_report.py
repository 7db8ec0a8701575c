"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without spilling, under the
Triton `make test` installs; under another release, as `benchmarks/compile_matrix.py` recorded it.

The report runs in a subprocess: this test session imported triton with TRITON_INTERPRET=1,
under which @triton.jit functions are interpreted and cannot be compiled."""

import faulthandler
import json
import os
import subprocess
import sys
from pathlib import Path

import triton

from fire_kernels.backends.triton_token_stats import backward_compiler_aborts

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def recorded_matrix() -> list[dict]:
    """The rows of the newest committed sm_80 / sm_90 compile matrix, one per (release, variant, arch)."""
    newest = sorted(RESULTS.glob("compile-matrix-aot-2*.json"))[-1]
    return json.loads(newest.read_text())["rows"]


def _key(row: dict) -> tuple:
    return row["kernel"], row["variant"], row["dtype"], row["arch"]


def test_every_kernel_compiles_as_recorded_for_this_triton():
    """Under a release the matrix has no row for (3.9, what `make test` installs, is recorded and
    clean) every variant must compile clean. Under an older one a user may have (torch 2.4-2.7 pin
    3.0-3.3), a variant recorded clean must stay clean, a recorded spill may not grow, and a variant
    may fail only where the matrix recorded the failure."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fire_kernels.compile_report", "--json"],
        env=env,
        capture_output=True,
        text=True,
        # a guard against a hung compiler, not a budget: under triton 3.2 (torch 2.6's) the report takes
        # 5.3 min alone on two cores and went past 10 beside another test worker
        timeout=1800,
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
    recorded = {_key(r): r for r in recorded_matrix() if r["triton"] == triton.__version__}
    worse = []
    for r in results:
        known = recorded.get(_key(r), {"ok": True, "spill_bytes": 0})
        allowed = r["spill_bytes"] <= known["spill_bytes"] if r["ok"] else not known["ok"]
        if not allowed:
            worse.append(f"{'/'.join(map(str, _key(r)))}: {r['error'] or r['spill_bytes']} (recorded: {known})")
    assert not worse, f"triton {triton.__version__}:\n" + "\n".join(worse)
    assert all(0 < r["registers"] <= 255 for r in results if r["ok"])
    assert (proc.returncode == 0) == all(r["ok"] and not r["spill_bytes"] for r in results), proc.stderr[-2000:]


def test_the_kernels_refuse_exactly_the_compiles_recorded_to_abort():
    """`triton_backward` (and `fire-opd train`'s checks) refuse a (release, arch, dtype) by
    backward_compiler_aborts; in the committed matrix, that rule names every failed compile and
    nothing that compiled, so no user meets the abort and none is refused for nothing."""
    from fire_kernels.compile_report import TORCH_DTYPES

    rows = recorded_matrix()
    assert len({r["triton"] for r in rows}) >= 10  # every release a torch pins, not a sample
    mismatched = [
        f"triton {r['triton']} {'/'.join(map(str, _key(r)))}: {'failed' if not r['ok'] else 'compiled'}"
        for r in rows
        if (not r["ok"])
        != (
            r["kernel"] == "_token_stats_bwd_kernel"
            and backward_compiler_aborts(r["triton"], divmod(r["arch"], 10), {TORCH_DTYPES[r["dtype"]]})
        )
    ]
    assert not mismatched, "\n".join(mismatched)


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
    jobs are run again one process each, and the report keeps every variant in order. The patched
    functions reach the workers by copy under fork, and by reference under forkserver (Linux's
    default from Python 3.14; the test passed with it set, 2026-12-08)."""
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
