"""Cross-checks against implementations we did not write: Liger-Kernel's chunked selective
log-prob and its chunked JSD distillation loss (the same beta convention as TRL)."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_problem

from fire_kernels import teacher_student_stats, token_stats

liger_ppo = pytest.importorskip("liger_kernel.chunked_loss.fused_linear_ppo")
liger_jsd = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss")


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprob_matches_liger_selective_logprob(backend, temperature):
    s_h, s_w, _, _, y = make_problem(33, 4099, 16, 16, torch.float32, seed=8, ignore_frac=0.0)
    if backend == "triton":  # keep the interpreted case small
        s_h, s_w, _, _, y = make_problem(20, 157, 16, 16, torch.float32, seed=8, ignore_frac=0.0)
    ours, _ = token_stats(s_h, s_w, y, temperature=temperature, backend=backend)
    theirs, _ = liger_ppo._selective_logprob_forward(s_h, s_w, y, temperature=temperature)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize(
    "beta,divergence",
    [(0.0, "jsd"), (1.0, "jsd"), (0.5, "jsd"), (0.2, "jsd"), (0.0, "forward_kl"), (1.0, "reverse_kl")],
)
def test_divergence_matches_liger_jsd_definition(backend, beta, divergence):
    s_h, s_w, t_h, t_w, y = make_problem(23, 67, 12, 20, torch.float32, seed=6, ignore_frac=0.3)
    ours = teacher_student_stats(s_h, s_w, t_h, t_w, y, divergence=divergence, jsd_beta=beta, backend=backend)
    student_logits, teacher_logits = s_h @ s_w.t(), t_h @ t_w.t()
    theirs_sum = liger_jsd.LigerFusedLinearJSDFunction.distillation_loss_fn(
        student_logits, teacher_logits, beta=beta, target=y, ignore_index=-100
    )
    torch.testing.assert_close(ours.divergence.sum(), theirs_sum, atol=1e-5, rtol=1e-5)
    # Per token as well: Liger's function on one row at a time.
    for i in range(0, 23, 5):
        row = liger_jsd.LigerFusedLinearJSDFunction.distillation_loss_fn(
            student_logits[i : i + 1], teacher_logits[i : i + 1], beta=beta, target=y[i : i + 1], ignore_index=-100
        )
        torch.testing.assert_close(ours.divergence[i], row, atol=1e-6, rtol=1e-5)
