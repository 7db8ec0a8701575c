"""float64 gradcheck of the chunked backend and stability at extreme logits."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import make_problem

from fire_kernels import teacher_student_stats, token_stats


@pytest.mark.parametrize(
    "divergence,jsd_beta",
    [(None, 0.5), ("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)],
)
def test_gradcheck_chunked_float64(small_chunks, divergence, jsd_beta):
    s_h, s_w, t_h, t_w, y = make_problem(6, 11, 4, 5, torch.float64, seed=1, ignore_frac=0.2)
    s_h.requires_grad_()
    s_w.requires_grad_()
    weights = torch.randn(3, 6, dtype=torch.float64)

    def f(h, w):
        out = teacher_student_stats(
            h, w, t_h, t_w, y, temperature=0.8, divergence=divergence, jsd_beta=jsd_beta, backend="chunked"
        )
        total = (weights[0] * out.student_log_prob).sum() + (weights[1] * out.student_entropy).sum()
        if divergence is not None:
            total = total + (weights[2] * out.divergence).sum()
        return total

    assert torch.autograd.gradcheck(f, (s_h, s_w), eps=1e-6, atol=1e-7, rtol=1e-5)


BACKENDS = ["chunked", "triton", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_of_magnitude_1e4(backend):
    torch.manual_seed(0)
    n, vocab, d = 8, 50, 4
    hidden = torch.randn(n, d) * 100
    weight = torch.randn(vocab, d) * 50  # |z| ~ 1e4
    y = torch.randint(0, vocab, (n,))
    hidden.requires_grad_()
    lp, ent = token_stats(hidden, weight, y, backend=backend)
    z = hidden.double() @ weight.double().t()
    expected = torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp.double(), expected, atol=2e-2, rtol=1e-5)  # fp32 logits at 1e4: ulp ~ 1e-3
    assert (ent >= -1e-4).all()
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_one_hot_distribution(backend):
    n, vocab, d = 5, 40, 3
    hidden = torch.zeros(n, d)
    hidden[:, 0] = 1.0
    weight = torch.zeros(vocab, d)
    weight[7, 0] = 1e4  # token 7 dominates by e^{1e4}
    y = torch.tensor([7, 7, 3, 7, -100])
    lp, ent = token_stats(hidden, weight, y, backend=backend)
    assert lp[0].item() == 0.0 and lp[1].item() == 0.0
    assert lp[2].item() == pytest.approx(-1e4, rel=1e-6)
    assert ent[:4].abs().max().item() < 1e-6 and lp[4].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_distribution(backend):
    n, vocab, d = 6, 97, 5
    hidden = torch.randn(n, d)
    weight = torch.zeros(vocab, d)
    y = torch.randint(0, vocab, (n,))
    lp, ent = token_stats(hidden, weight, y, backend=backend)
    torch.testing.assert_close(lp, torch.full((n,), -math.log(vocab)), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, torch.full((n,), math.log(vocab)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_identical_teacher_and_student(backend, divergence):
    s_h, s_w, _, _, y = make_problem(13, 61, 9, 9, torch.float32, seed=4)
    s_h.requires_grad_()
    s_w.requires_grad_()
    out = teacher_student_stats(s_h, s_w, s_h.detach(), s_w.detach(), y, divergence=divergence, backend=backend)
    assert out.divergence.abs().max().item() < 1e-6
    torch.testing.assert_close(out.teacher_log_prob, out.student_log_prob.detach())
    gh, gw = torch.autograd.grad(out.divergence.sum(), (s_h, s_w))
    assert gh.abs().max().item() < 1e-5 and gw.abs().max().item() < 1e-5
