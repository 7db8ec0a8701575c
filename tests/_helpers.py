"""Shared helpers for the kernel tests: random problems and the per-dtype tolerances."""

from __future__ import annotations

import torch

# Tolerances against the fp32 reference computed from the same (rounded) inputs. Outputs are
# accumulated in fp32 by every backend, so they agree to fp32 round-off whatever the input
# dtype. Gradients: the fused backends round dL/dz to the parameter dtype before the
# tensor-core product (as Cut Cross-Entropy does), so half-precision gradients carry that
# dtype's rounding; the bound is relative to the largest gradient entry.
OUTPUT_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
OUTPUT_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Absolute floor for gradients that are exactly zero in exact arithmetic (V = 1, p == q),
# where round-off of O(1) logits leaves O(eps) residue.
GRAD_ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def make_problem(n, vocab, d_s, d_t, dtype, *, seed=0, ignore_frac=0.2, scale=1.0, teacher_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    s_h = (torch.randn(n, d_s, generator=gen) * scale).to(dtype)
    s_w = (torch.randn(vocab, d_s, generator=gen) / max(d_s, 1) ** 0.5 * 2).to(dtype)
    t_dtype = teacher_dtype or dtype
    t_h = (torch.randn(n, d_t, generator=gen) * scale).to(t_dtype)
    t_w = (torch.randn(vocab, d_t, generator=gen) / max(d_t, 1) ** 0.5 * 2).to(t_dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if n:
        targets[torch.rand(n, generator=gen) < ignore_frac] = -100
    return s_h, s_w, t_h, t_w, targets


def assert_close_output(actual, expected, dtype, name):
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        atol=OUTPUT_ATOL[dtype],
        rtol=OUTPUT_RTOL[dtype],
        msg=lambda m: f"{name}: {m}",
    )


def assert_close_grad(actual, expected, dtype, name):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= GRAD_RTOL[dtype] * scale + GRAD_ATOL[dtype], (
        f"{name}: max error {err:.3e} vs scale {scale:.3e} ({dtype})"
    )
