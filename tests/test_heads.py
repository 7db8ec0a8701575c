"""Heads beyond h @ W^T (docs: Kernels): lm_head bias, logit scale and final-logit soft-capping,
on every backend and in the fused updates, against the materialized oracle.

z = softcap * tanh(((h W^T + b) * scale) / softcap) / tau; the student's bias gets its gradient.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_close_grad, assert_close_output, cancelled_terms, make_problem
from hypothesis import given
from hypothesis import strategies as st

from fire_kernels import LMHead, teacher_student_stats, token_stats
from fire_kernels._validation import HeadSpec
from fire_kernels.fused_update import linear_divergence_update, linear_log_prob_update
from fire_kernels.reference import materialized_log_softmax

HEADS = st.fixed_dictionaries(
    {
        "bias": st.booleans(),
        "logit_scale": st.sampled_from([1.0, 0.25, 1.7]),
        "logit_softcap": st.sampled_from([None, 2.0, 30.0]),
    }
)


def _head(spec: dict, weight: torch.Tensor, seed: int) -> LMHead:
    gen = torch.Generator().manual_seed(seed)
    bias = (torch.randn(weight.shape[0], generator=gen) * 2).to(weight.dtype) if spec["bias"] else None
    return LMHead(weight, bias, spec["logit_scale"], spec["logit_softcap"])


def _coefficients(n: int) -> torch.Tensor:
    """[3, n] upstream gradients of (log-prob, entropy, divergence)."""
    return torch.randn(3, n, generator=torch.Generator().manual_seed(1))


def _run(backend, s_h, head: LMHead, t_h, teacher_head: LMHead, y, *, divergence, temperature):
    """Outputs and the gradients w.r.t. (hidden, weight, bias) of a random combination of the outputs."""
    s_h = s_h.detach().clone().requires_grad_()
    s_w = head.weight.detach().clone().requires_grad_()
    bias = None if head.bias is None else head.bias.detach().clone().requires_grad_()
    head = LMHead(s_w, bias, head.logit_scale, head.logit_softcap)
    out = teacher_student_stats(
        s_h, head, t_h, teacher_head, y, temperature=temperature, divergence=divergence, backend=backend
    )
    coeffs = _coefficients(y.shape[0])
    loss = (coeffs[0] * out.student_log_prob).sum() + (coeffs[1] * out.student_entropy).sum()
    if divergence is not None:
        loss = loss + (coeffs[2] * out.divergence).sum()
    inputs = (s_h, s_w) + ((bias,) if bias is not None else ())
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if y.numel() else (None,) * len(inputs)
    return out, grads


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("divergence", [None, "reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@given(
    student=HEADS,
    teacher=HEADS,
    vocab=st.sampled_from([1, 7, 37, 101]),
    n=st.integers(1, 30),
    temperature=st.sampled_from([1.0, 0.7]),
    seed=st.integers(0, 1000),
)
def test_heads_match_reference(small_chunks, backend, divergence, dtype, student, teacher, vocab, n, temperature, seed):
    s_h, s_w, t_h, t_w, y = make_problem(n, vocab, 12, 20, dtype, seed=seed, scale=3.0)
    head, teacher_head = _head(student, s_w, seed), _head(teacher, t_w, seed + 1)
    ref, ref_grads = _run("reference", s_h, head, t_h, teacher_head, y, divergence=divergence, temperature=temperature)
    got, got_grads = _run(backend, s_h, head, t_h, teacher_head, y, divergence=divergence, temperature=temperature)
    for field in got._fields:
        if getattr(ref, field) is not None:
            assert_close_output(getattr(got, field), getattr(ref, field), dtype, f"{backend}/{field}")
    # Two recomputes of a logit differ by up to twice its round-off; the head's Jacobian
    # (<= scale / tau) applies once to the logit and once to its gradient.
    jacobian = head.logit_scale / temperature
    dz_scale = 2 * jacobian**2 * _coefficients(y.shape[0]).abs().sum(0)
    spec = HeadSpec(head.bias is not None, head.logit_scale, head.logit_softcap)
    probs = materialized_log_softmax(s_h, head.weight, 1 / temperature, spec, head.bias).exp()
    cancelled = cancelled_terms(s_h, head.weight, head.bias, probs, dz_scale)
    for name, g, r, c in zip(("grad_hidden", "grad_weight", "grad_bias"), got_grads, ref_grads, cancelled):
        assert g.dtype == r.dtype
        assert_close_grad(g, r, dtype, f"{backend}/{name}", cancelled=c)


def test_softcap_and_scale_change_the_statistics():
    """The head arguments are used, not dropped: each changes the outputs, and a soft-cap of c
    keeps every |logit| below c / tau (entropy bounded away from 0 at |h W| ~ 1e4)."""
    s_h, s_w, t_h, t_w, y = make_problem(9, 31, 8, 8, torch.float32, seed=2, ignore_frac=0.0)
    plain = token_stats(s_h, s_w, y, backend="chunked")
    for head in (LMHead(s_w, logit_scale=0.5), LMHead(s_w, logit_softcap=1.0), LMHead(s_w, torch.linspace(-3, 3, 31))):
        changed = token_stats(s_h, head, y, backend="chunked")
        assert (changed[1] - plain[1]).abs().min() > 1e-4, head
    # |h W| ~ 1e4: plain logits give a one-hot softmax (entropy 0, log p ~ -1e4); a soft-cap of
    # c bounds every logit by c, so log p >= -2c - log V and the entropy stays positive.
    big = s_h * 1e3
    assert token_stats(big, s_w, y, backend="chunked")[0].min() < -1e3
    log_prob, entropy = token_stats(big, LMHead(s_w, logit_softcap=5.0), y, backend="chunked")
    assert bool((log_prob >= -10.0 - torch.log(torch.tensor(31.0)) - 1e-4).all()) and bool((entropy > 0).all())


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_extreme_logits_under_softcap(backend):
    s_h, s_w, t_h, t_w, y = make_problem(13, 37, 8, 8, torch.float32, seed=4, scale=1e4)
    head, teacher_head = LMHead(s_w, torch.randn(37) * 1e3, logit_softcap=30.0), LMHead(t_w, logit_softcap=30.0)
    ref = teacher_student_stats(s_h, head, t_h, teacher_head, y, divergence="reverse_kl", backend="reference")
    got = teacher_student_stats(s_h, head, t_h, teacher_head, y, divergence="reverse_kl", backend=backend)
    for field in got._fields:
        assert torch.isfinite(getattr(got, field)).all(), field
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), atol=2e-4, rtol=1e-5)


def test_chunked_heads_gradcheck(small_chunks):
    s_h, s_w, t_h, t_w, y = make_problem(6, 11, 4, 5, torch.float64, seed=8)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    s_h.requires_grad_()
    s_w.requires_grad_()

    def f(h, w, b):
        out = teacher_student_stats(
            h,
            LMHead(w, b, logit_scale=0.8, logit_softcap=3.0),
            t_h,
            LMHead(t_w, logit_scale=1.3),
            y,
            divergence="jsd",
            jsd_beta=0.3,
            temperature=0.9,
            backend="chunked",
        )
        return out.student_log_prob, out.student_entropy, out.divergence

    assert torch.autograd.gradcheck(f, (s_h, s_w, bias))


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_fused_updates_with_heads(backend):
    s_h, s_w, t_h, t_w, y = make_problem(23, 41, 10, 14, torch.float32, seed=6, scale=2.0)
    bias = torch.randn(41)
    head = LMHead(s_w, bias, logit_scale=0.6, logit_softcap=4.0)
    teacher_head = LMHead(t_w, torch.randn(41), logit_scale=1.5, logit_softcap=3.0)
    coefficient = torch.rand(23)

    # dense: sum_t c_t D_t
    h, w, b = (t.clone().requires_grad_() for t in (s_h, s_w, bias))
    tracked = LMHead(w, b, logit_scale=0.6, logit_softcap=4.0)
    ref = teacher_student_stats(h, tracked, t_h, teacher_head, y, divergence="reverse_kl", backend="reference")
    (coefficient * ref.divergence).sum().backward()
    out = linear_divergence_update(
        s_h, head, t_h, teacher_head, y, coefficient, divergence="reverse_kl", backend=backend
    )
    assert_close_output(out.divergence, ref.divergence, torch.float32, "divergence")
    for name, got, want in (
        ("hidden", out.grad_hidden, h.grad),
        ("weight", out.grad_weight, w.grad),
        ("bias", out.grad_bias, b.grad),
    ):
        assert_close_grad(got, want, torch.float32, f"dense grad_{name}")

    # log-prob update with a caller's dL/dlog_prob
    h, w, b = (t.clone().requires_grad_() for t in (s_h, s_w, bias))
    lp, _ = token_stats(h, LMHead(w, b, logit_scale=0.6, logit_softcap=4.0), y, backend="reference")
    (coefficient * lp).sum().backward()
    out = linear_log_prob_update(
        s_h, head, y, lambda lp, rows: ((coefficient[rows] * lp).sum(), coefficient[rows]), backend=backend
    )
    for name, got, want in (
        ("hidden", out.grad_hidden, h.grad),
        ("weight", out.grad_weight, w.grad),
        ("bias", out.grad_bias, b.grad),
    ):
        assert_close_grad(got, want, torch.float32, f"log_prob grad_{name}")


def test_bad_heads():
    s_h, s_w, t_h, t_w, y = make_problem(4, 9, 3, 3, torch.float32)
    with pytest.raises(ValueError, match=r"head.bias must have shape \[9\]"):
        token_stats(s_h, LMHead(s_w, torch.zeros(8)), y)
    with pytest.raises(TypeError, match="head.bias must be a torch.Tensor"):
        token_stats(s_h, LMHead(s_w, [0.0] * 9), y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head.logit_scale must be a finite number > 0"):
        token_stats(s_h, LMHead(s_w, logit_scale=0.0), y)
    with pytest.raises(ValueError, match="head.logit_softcap must be None or a finite number > 0"):
        token_stats(s_h, LMHead(s_w, logit_softcap=-1.0), y)
    with pytest.raises(ValueError, match=r"teacher_head.bias must have shape \[9\]"):
        teacher_student_stats(s_h, s_w, t_h, LMHead(t_w, torch.zeros(3)), y)
    with pytest.raises(ValueError, match="teacher_head.logit_scale must be a finite number > 0"):
        teacher_student_stats(s_h, s_w, t_h, LMHead(t_w, logit_scale=float("nan")), y)
    with pytest.raises(TypeError, match="head must be a \\[V, D\\] torch.Tensor or a fire_kernels.LMHead, got list"):
        token_stats(s_h, [[0.0]], y)  # type: ignore[arg-type]
    # the old per-argument head keywords are gone: one head type
    with pytest.raises(TypeError, match="unexpected keyword argument 'bias'"):
        token_stats(s_h, s_w, y, bias=torch.zeros(9))  # type: ignore[call-arg]
