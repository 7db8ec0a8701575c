"""The chunked backend's CUDA path (`fire_kernels.backends.tile_fold`: cuBLAS tiles, Triton folds), run on
CPU tensors in Triton's interpreter with tiles small enough that every problem spans many of them."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_close_grad, assert_close_output, make_problem
from hypothesis import given
from hypothesis import strategies as st

from fire_kernels import LMHead, teacher_student_stats, token_stats
from fire_kernels.backends import tile_fold


@pytest.fixture
def fold_on_cpu(monkeypatch):
    monkeypatch.setattr(tile_fold, "FORCE_ON_CPU", True)
    monkeypatch.setattr(tile_fold, "TOKEN_CHUNK", 8)
    monkeypatch.setattr(tile_fold, "VOCAB_CHUNK", 40)
    monkeypatch.setattr(tile_fold, "FOLD_BLOCK_V", 16)


def _outputs_and_grads(backend, s_h, s_w, t_h, t_w, y, divergence, heads, temperature):
    h, w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
    bias = heads.get("bias")
    bias = bias.clone().requires_grad_() if bias is not None else None
    head = LMHead(w, bias, heads.get("logit_scale", 1.0), heads.get("logit_softcap"))
    teacher_head = LMHead(t_w, heads.get("teacher_bias"), 1.0, heads.get("teacher_logit_softcap"))
    out = teacher_student_stats(
        h, head, t_h, teacher_head, y, divergence=divergence, backend=backend, temperature=temperature
    )
    gen = torch.Generator().manual_seed(1)
    c = [torch.randn(y.shape[0], generator=gen) for _ in range(3)]
    loss = (c[0] * out.student_log_prob).sum() + (c[1] * out.student_entropy).sum()
    if divergence:
        loss = loss + (c[2] * out.divergence).sum()
    inputs = (h, w) + ((bias,) if bias is not None else ())
    return out, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("divergence", [None, "reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@given(
    n=st.integers(1, 30),
    vocab=st.sampled_from([1, 7, 41, 97]),
    heads=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    temperature=st.sampled_from([1.0, 0.7]),
    seed=st.integers(0, 1000),
)
def test_fold_matches_reference(fold_on_cpu, divergence, dtype, n, vocab, heads, ignore_frac, temperature, seed):
    s_h, s_w, t_h, t_w, y = make_problem(n, vocab, 12, 20, dtype, seed=seed, ignore_frac=ignore_frac)
    head = (
        dict(
            bias=torch.randn(vocab).to(dtype),
            logit_scale=0.8,
            logit_softcap=3.0,
            teacher_logit_softcap=2.0,
            teacher_bias=torch.randn(vocab).to(dtype),
        )
        if heads
        else {}
    )
    ref, ref_grads = _outputs_and_grads("reference", s_h, s_w, t_h, t_w, y, divergence, head, temperature)
    got, got_grads = _outputs_and_grads("chunked", s_h, s_w, t_h, t_w, y, divergence, head, temperature)
    for field in got._fields:
        if getattr(ref, field) is not None:
            assert_close_output(getattr(got, field), getattr(ref, field), dtype, f"fold/{field}")
    for name, g, r in zip(("grad_hidden", "grad_weight", "grad_bias"), got_grads, ref_grads):
        assert g.dtype == r.dtype
        assert_close_grad(g, r, dtype, f"fold/{name}")


def test_fold_is_used_and_skips_rows_without_gradient(fold_on_cpu, monkeypatch):
    """The chunked backend really goes through the fold kernels when enabled, and a backward
    whose rows all carry zero gradient launches no fold."""
    calls = {"stats": 0, "grad": 0}
    for name, key in (("_fold_stats_kernel", "stats"), ("_fold_grad_kernel", "grad")):
        kernel = getattr(tile_fold, name)

        class Counting:
            def __init__(self, kernel, key):
                self.kernel, self.key = kernel, key

            def __getitem__(self, grid):
                calls[self.key] += 1
                return self.kernel[grid]

        monkeypatch.setattr(tile_fold, name, Counting(kernel, key))
    s_h, s_w, _, _, y = make_problem(20, 90, 8, 8, torch.float32, seed=1, ignore_frac=0.0)
    h = s_h.clone().requires_grad_()
    lp, ent = token_stats(h, s_w, y, backend="chunked")
    assert calls["stats"] == 3 * 3  # 3 token chunks x 3 vocab chunks
    (0.0 * lp.sum() + 0.0 * ent.sum()).backward()
    assert calls["grad"] == 0 and torch.equal(h.grad, torch.zeros_like(h))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_fused_updates_on_the_fold_path(fold_on_cpu, divergence):
    """On CUDA the chunked fused updates run forward fold + backward fold (no whole vocabulary rows)."""
    from fire_kernels.fused_update import linear_divergence_update, linear_log_prob_update

    s_h, s_w, t_h, t_w, y = make_problem(21, 53, 10, 14, torch.float32, seed=4)
    coefficient = torch.rand(21)
    bias = torch.randn(53)
    h, w, b = (t.clone().requires_grad_() for t in (s_h, s_w, bias))
    ref = teacher_student_stats(
        h, LMHead(w, b, logit_softcap=4.0), t_h, t_w, y, divergence=divergence, backend="reference"
    )
    (coefficient * ref.divergence).sum().backward()
    out = linear_divergence_update(
        s_h, LMHead(s_w, bias, logit_softcap=4.0), t_h, t_w, y, coefficient, divergence=divergence, backend="chunked"
    )
    assert_close_output(out.divergence, ref.divergence, torch.float32, "divergence")
    for got, want in ((out.grad_hidden, h.grad), (out.grad_weight, w.grad), (out.grad_bias, b.grad)):
        assert_close_grad(got, want, torch.float32, "dense update")

    h, w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
    lp, _ = token_stats(h, w, y, backend="reference")
    (coefficient * lp).sum().backward()
    out = linear_log_prob_update(
        s_h, s_w, y, lambda lp, rows: ((coefficient[rows] * lp).sum(), coefficient[rows]), backend="chunked"
    )
    assert_close_grad(out.grad_hidden, h.grad, torch.float32, "logprob update dh")
    assert_close_grad(out.grad_weight, w.grad, torch.float32, "logprob update dW")
