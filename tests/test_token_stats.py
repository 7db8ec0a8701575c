"""Every output and gradient of the fused backends against the materialized oracle."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_close_grad, assert_close_output, make_problem
from hypothesis import given
from hypothesis import strategies as st

from fire_kernels import teacher_student_stats, token_stats
from fire_kernels.backends import triton_token_stats

DIVERGENCES = [None, "reverse_kl", "forward_kl", "jsd"]
HALF_AND_FULL = [torch.float32, torch.float16, torch.bfloat16]


def _run(backend, s_h, s_w, t_h, t_w, targets, *, divergence, temperature=1.0, jsd_beta=0.5, seed=0):
    """Outputs and the gradients of a random per-row combination of the differentiable outputs."""
    s_h = s_h.detach().clone().requires_grad_()
    s_w = s_w.detach().clone().requires_grad_()
    out = teacher_student_stats(
        s_h, s_w, t_h, t_w, targets, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta, backend=backend
    )
    gen = torch.Generator().manual_seed(seed + 1)
    n = targets.shape[0]
    coeffs = [torch.randn(n, generator=gen, dtype=out.student_log_prob.dtype) for _ in range(3)]
    loss = (coeffs[0] * out.student_log_prob).sum() + (coeffs[1] * out.student_entropy).sum()
    if divergence is not None:
        loss = loss + (coeffs[2] * out.divergence).sum()
    grad_h, grad_w = torch.autograd.grad(loss, (s_h, s_w), allow_unused=True)
    return out, grad_h, grad_w


def _compare(backend, dtype, s_h, s_w, t_h, t_w, targets, divergence, **kw):
    ref, ref_gh, ref_gw = _run("reference", s_h, s_w, t_h, t_w, targets, divergence=divergence, **kw)
    got, got_gh, got_gw = _run(backend, s_h, s_w, t_h, t_w, targets, divergence=divergence, **kw)
    for field in got._fields:
        if getattr(ref, field) is None:
            assert getattr(got, field) is None, field
            continue
        assert getattr(got, field).dtype == getattr(ref, field).dtype, field
        assert_close_output(getattr(got, field), getattr(ref, field), dtype, f"{backend}/{field}")
    assert got_gh.dtype == s_h.dtype and got_gw.dtype == s_w.dtype
    assert_close_grad(got_gh, ref_gh, dtype, f"{backend}/grad_hidden")
    assert_close_grad(got_gw, ref_gw, dtype, f"{backend}/grad_weight")


problem_shapes = st.fixed_dictionaries(
    {
        "n": st.integers(0, 40),
        "vocab": st.sampled_from([1, 2, 7, 31, 37, 64, 97, 101, 131]),  # primes and tile-unaligned sizes
        "d_s": st.integers(1, 48),
        "d_t": st.integers(1, 48),
        "temperature": st.sampled_from([1.0, 0.7, 2.0]),
        "ignore_frac": st.sampled_from([0.0, 0.3, 1.0]),
        "seed": st.integers(0, 10_000),
    }
)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", HALF_AND_FULL)
@given(shape=problem_shapes)
def test_chunked_matches_reference(small_chunks, dtype, divergence, shape):
    s_h, s_w, t_h, t_w, y = make_problem(
        shape["n"],
        shape["vocab"],
        shape["d_s"],
        shape["d_t"],
        dtype,
        seed=shape["seed"],
        ignore_frac=shape["ignore_frac"],
    )
    _compare("chunked", dtype, s_h, s_w, t_h, t_w, y, divergence, temperature=shape["temperature"])


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", HALF_AND_FULL)
@given(shape=problem_shapes, splits=st.sampled_from([None, 2, 3]))
def test_triton_matches_reference(monkeypatch, dtype, divergence, shape, splits):
    if splits is not None:  # force the vocab split + host merge that a GPU uses at small N
        monkeypatch.setattr(triton_token_stats, "_num_splits", lambda *a: splits)
    s_h, s_w, t_h, t_w, y = make_problem(
        shape["n"],
        shape["vocab"],
        shape["d_s"],
        shape["d_t"],
        dtype,
        seed=shape["seed"],
        ignore_frac=shape["ignore_frac"],
    )
    _compare("triton", dtype, s_h, s_w, t_h, t_w, y, divergence, temperature=shape["temperature"])


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.9, 1.0])
def test_jsd_beta_range(small_chunks, backend, beta):
    s_h, s_w, t_h, t_w, y = make_problem(19, 45, 12, 20, torch.float32, seed=3)
    _compare(backend, torch.float32, s_h, s_w, t_h, t_w, y, "jsd", jsd_beta=beta)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_teacher_and_student_dtypes_may_differ(small_chunks, backend):
    s_h, s_w, t_h, t_w, y = make_problem(21, 53, 16, 24, torch.float32, seed=5, teacher_dtype=torch.bfloat16)
    _compare(backend, torch.float32, s_h, s_w, t_h, t_w, y, "reverse_kl")


@pytest.mark.parametrize("backend", ["chunked", "triton", "reference"])
def test_token_stats_matches_teacher_student_student_half(small_chunks, backend):
    s_h, s_w, t_h, t_w, y = make_problem(17, 40, 8, 8, torch.float32, seed=7)
    lp, ent = token_stats(s_h, s_w, y, temperature=0.5, backend=backend)
    full = teacher_student_stats(s_h, s_w, t_h, t_w, y, temperature=0.5, backend="reference")
    assert_close_output(lp, full.student_log_prob, torch.float32, "logprob")
    assert_close_output(ent, full.student_entropy, torch.float32, "entropy")


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_non_contiguous_inputs(small_chunks, backend):
    s_h, s_w, t_h, t_w, y = make_problem(24, 50, 10, 14, torch.float32, seed=9)
    # Views with non-unit strides: every other row of a wider buffer, and a transposed weight.
    wide = torch.randn(48, 10)
    wide[::2] = s_h
    s_h_view = wide[::2]
    s_w_view = s_w.t().contiguous().t()
    t_h_view = torch.cat([t_h, t_h], dim=1)[:, :14]
    assert not s_h_view.is_contiguous() and not t_h_view.is_contiguous()
    ref = teacher_student_stats(s_h, s_w, t_h, t_w, y, divergence="reverse_kl", backend="reference")
    got = teacher_student_stats(s_h_view, s_w_view, t_h_view, t_w, y, divergence="reverse_kl", backend=backend)
    for field in got._fields:
        assert_close_output(getattr(got, field), getattr(ref, field), torch.float32, field)


@pytest.mark.parametrize("backend", ["chunked", "triton", "reference"])
def test_empty_batch(backend):
    s_h, s_w, t_h, t_w, y = make_problem(0, 33, 8, 8, torch.float32)
    s_h.requires_grad_()
    s_w.requires_grad_()
    out = teacher_student_stats(s_h, s_w, t_h, t_w, y, divergence="jsd", backend=backend)
    assert all(getattr(out, f).shape == (0,) for f in out._fields)
    (out.student_log_prob.sum() + out.divergence.sum()).backward()
    assert s_h.grad.shape == (0, 8) and torch.count_nonzero(s_w.grad) == 0


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_ignored_rows_give_zero_and_get_zero_gradient(small_chunks, backend):
    s_h, s_w, t_h, t_w, y = make_problem(12, 30, 8, 8, torch.float32, seed=11, ignore_frac=0.0)
    y[::3] = -100
    s_h.requires_grad_()
    out = teacher_student_stats(s_h, s_w, t_h, t_w, y, divergence="reverse_kl", backend=backend)
    for field in out._fields:
        assert torch.all(getattr(out, field)[::3] == 0), field
    # An upstream gradient on ignored rows must not leak into the inputs.
    (out.student_log_prob.sum() + out.student_entropy.sum() + out.divergence.sum()).backward()
    assert torch.all(s_h.grad[::3] == 0)
    assert torch.all(s_h.grad[1::3].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_every_token_ignored(backend):
    s_h, s_w, t_h, t_w, y = make_problem(9, 30, 8, 8, torch.float32, ignore_frac=1.0)
    s_h.requires_grad_()
    s_w.requires_grad_()
    out = teacher_student_stats(s_h, s_w, t_h, t_w, y, divergence="forward_kl", backend=backend)
    assert all(torch.all(getattr(out, f) == 0) for f in out._fields)
    (out.student_log_prob.sum() + out.divergence.sum()).backward()
    assert torch.count_nonzero(s_h.grad) == 0 and torch.count_nonzero(s_w.grad) == 0


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_teacher_gets_no_gradient_and_frozen_weight_skips_its_gradient(backend):
    s_h, s_w, t_h, t_w, y = make_problem(10, 30, 8, 8, torch.float32, seed=2)
    s_h.requires_grad_()
    t_h.requires_grad_()
    t_w.requires_grad_()
    out = teacher_student_stats(s_h, s_w, t_h, t_w, y, divergence="reverse_kl", backend=backend)
    assert not out.teacher_log_prob.requires_grad and not out.teacher_entropy.requires_grad
    out.divergence.sum().backward()
    assert t_h.grad is None and t_w.grad is None and s_w.grad is None
    assert s_h.grad is not None and torch.count_nonzero(s_h.grad) > 0


def test_auto_backend_is_chunked_everywhere():
    """The documented rule (csrc_notes/tile_fold.md): chunked, which on CUDA is cuBLAS + Triton folds."""
    from fire_kernels.backends import tile_fold
    from fire_kernels.token_stats import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "chunked"
    assert tile_fold.enabled(torch.device("cuda", 0)) and not tile_fold.enabled(torch.device("cpu"))


@pytest.mark.parametrize("divergence, tiles", [(None, 3), ("reverse_kl", 3), ("forward_kl", 4), ("jsd", 3)])
def test_chunked_working_set_is_a_few_tiles(monkeypatch, divergence, tiles):
    """The chunked call (forward + backward) holds `tiles` [token_chunk, vocab_chunk] tiles and O(N)
    row state, whatever N and V: 3 (z, e = exp(z - m), a scratch tile), a fourth for forward KL,
    whose cross term needs z after the teacher's update; JSD's second sweep and gradient fit the
    same memory in half-height tiles. Counted from the profiler's allocation events, as
    benchmarks/bench_memory.py counts the working set the docs quote."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from _memory import tensor_peak_bytes

    from fire_kernels.backends import chunked

    monkeypatch.setattr(chunked, "DEFAULT_TOKEN_CHUNK", 64)
    monkeypatch.setattr(chunked, "DEFAULT_VOCAB_CHUNK", 256)
    tile_bytes = 64 * 256 * 4
    n = 512
    s_h, s_w, t_h, t_w, y = make_problem(n, 2048, 32, 48, torch.float32, seed=5)
    s_h.requires_grad_()
    s_w.requires_grad_()

    def call():
        out = teacher_student_stats(s_h, s_w, t_h, t_w, y, divergence=divergence, backend="chunked")
        loss = out.student_log_prob.sum() + out.student_entropy.sum()
        return torch.autograd.grad(loss + out.divergence.sum() if divergence else loss, (s_h, s_w))

    call()
    _, working_set = tensor_peak_bytes(call)
    row_state = 24 * n * 4  # per-row statistics and upstream gradients: about 24 fp32 vectors of N
    assert (tiles - 1) * tile_bytes < working_set <= tiles * tile_bytes + row_state, working_set / tile_bytes


def test_triton_backward_refuses_the_one_compiler_known_to_abort_on_it(monkeypatch):
    """Triton 3.2 (torch 2.6) aborts the process compiling the 16-bit backward for sm_90
    (benchmarks/compile_matrix.py): exactly that case gets one line instead."""
    rule = triton_token_stats.backward_compiler_aborts
    assert rule("3.2.0", (9, 0), {torch.bfloat16}) and rule("3.2.0", (9, 0), {torch.float16, torch.float32})
    assert not rule("3.2.0", (9, 0), {torch.float32})
    assert not rule("3.2.0", (8, 0), {torch.bfloat16})
    assert not rule("3.3.1", (9, 0), {torch.bfloat16}) and not rule("3.1.0", (9, 0), {torch.bfloat16})

    monkeypatch.setattr(triton_token_stats, "interpreter_active", lambda: False)
    monkeypatch.setattr(triton_token_stats.triton, "__version__", "3.2.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    bf16 = torch.zeros(2, 2, dtype=torch.bfloat16)
    cuda = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"backend='triton' .* sm_90 with Triton 3\.2\.0 .* backend='chunked'"):
        triton_token_stats.refuse_known_compiler_abort(cuda, bf16.float(), bf16, None)
    triton_token_stats.refuse_known_compiler_abort(cuda, bf16.float(), None)  # fp32 compiles
    triton_token_stats.refuse_known_compiler_abort(torch.device("cpu"), bf16)


def test_triton_backward_asks_about_the_compiler_before_it_launches(monkeypatch):
    def refuse(device, *operands):
        raise RuntimeError(f"refused on {device}: {[t.dtype for t in operands if t is not None]}")

    monkeypatch.setattr(triton_token_stats, "refuse_known_compiler_abort", refuse)
    s_h, s_w, t_h, t_w, y = make_problem(6, 40, 8, 8, torch.float32, seed=3)
    s_h.requires_grad_()
    out = teacher_student_stats(s_h, s_w, t_h, t_w, y, divergence="reverse_kl", backend="triton")
    with pytest.raises(RuntimeError, match=r"refused on cpu: \[torch.float32(, torch.float32){3}\]"):
        out.divergence.sum().backward()


def test_fp32_heads_take_the_narrow_backward_tile_where_the_wide_one_spills(monkeypatch):
    """An fp32 backward with a bias or soft-cap spills with a 32-wide D tile under every Triton
    3.0-3.8 and fits it under 3.9 (benchmarks/compile_matrix.py); 16-bit and plain heads keep theirs."""
    release = triton_token_stats.triton_release
    assert release("3.9.0") == (3, 9) and release("3.2.0+git1a2b") == (3, 2) and release("nightly") == (0, 0)
    monkeypatch.setattr(triton_token_stats, "interpreter_active", lambda: False)
    config = triton_token_stats.default_config
    wide = release(triton_token_stats.triton.__version__) >= (3, 9)
    assert config(torch.float32, head=True).bwd_block_d == (32 if wide else 16)
    assert config(torch.float32) == triton_token_stats.FP32_CONFIG and config(torch.float32).bwd_block_d == 32
    assert config(torch.bfloat16, head=True) == config(torch.bfloat16) == triton_token_stats.TritonTileConfig()


@pytest.mark.parametrize("head", ["plain", "softcap", "bias"])
def test_triton_backward_asks_for_the_tile_of_its_head(monkeypatch, head):
    from fire_kernels import LMHead

    asked = []

    def config(dtype, head=False):
        asked.append(head)
        return triton_token_stats.INTERPRETER_CONFIG

    monkeypatch.setattr(triton_token_stats, "default_config", config)
    s_h, s_w, t_h, t_w, y = make_problem(6, 40, 8, 8, torch.float32, seed=4)
    s_h.requires_grad_()
    teacher = {"plain": LMHead(t_w), "softcap": LMHead(t_w, logit_softcap=30.0), "bias": LMHead(t_w, torch.zeros(40))}
    out = teacher_student_stats(s_h, s_w, t_h, teacher[head], y, divergence="reverse_kl", backend="triton")
    out.divergence.sum().backward()
    assert asked[-1] is (head != "plain")
