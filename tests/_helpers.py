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
# Unit round-off of the fp32 accumulation every backend recomputes its logits in (below).
FP32_UNIT_ROUNDOFF = 2.0**-24


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


def assert_close_grad(actual, expected, dtype, name, *, cancelled: float = 0.0):
    """|actual - expected| <= rtol * max|expected| + atol + u * cancelled.

    `cancelled` is the size of the terms that cancel in exact arithmetic (`cancelled_terms`):
    where a gradient is exactly zero (V = 1: p = 1 whatever the logit) the fused backends
    recompute each logit in fp32, off by ~u |z| from the forward's, and sum that residue over
    tokens or the vocabulary; how far is a property of the problem (|z|, |h|, N), not of the
    backend, so a fixed floor passes or fails with the machine's BLAS blocking."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    bound = GRAD_RTOL[dtype] * scale + GRAD_ATOL[dtype] + FP32_UNIT_ROUNDOFF * cancelled
    assert err <= bound, f"{name}: max error {err:.3e} vs scale {scale:.3e}, bound {bound:.3e} ({dtype})"


def cancelled_terms(hidden, weight, bias, probs, dz_scale) -> tuple[float, float, float]:
    """Upper bounds of sum |delta dL/dr| |other operand| for (grad_hidden, grad_weight,
    grad_bias) when each logit is recomputed with a round-off of |delta r| <= |h| |W|^T + |b|
    (per unit round-off): p_v moves by p_v delta z_v, so the error of dL/dz_v is that times
    `dz_scale` [N] (the head's Jacobian and the sum of the row's upstream coefficients).
    `probs` [N, V]: the student's softmax."""
    h, w = hidden.double().abs(), weight.double().abs()
    r = h @ w.T + (0.0 if bias is None else bias.double().abs())
    dz = r * probs.double() * dz_scale.double()[:, None]
    return (dz @ w).max().item(), (dz.T @ h).max().item(), dz.sum(0).max().item()


def free_port() -> int:
    """A TCP port on 127.0.0.1 no process is listening on (for a spawned group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_gloo_group(worker, world: int, *args) -> None:
    """`worker(rank, world, *args)` in `world` spawned processes joined in one gloo group (a
    module-level function, so that spawn can pickle it); raises if any process fails."""
    import torch.multiprocessing as mp

    mp.spawn(_in_gloo_group, args=(world, free_port(), worker, args), nprocs=world, join=True)


def _in_gloo_group(rank: int, world: int, port: int, worker, args: tuple) -> None:
    """One process of `run_in_gloo_group`: after its worker succeeded, a barrier (so that every
    process is done with the group), then the process ends at once, without destroying the group.

    Why not `destroy_process_group`: under torch 2.6 it deadlocks now and then on gloo
    (pytorch/pytorch#75097). py-spy on one process of a 3-process test that hung 18 minutes in
    `make test-oldest` (e0959b5) showed why: destroying the group holds the GIL while it joins
    gloo's worker thread, and that thread waits for the GIL to release the last Python tensor of
    a finished all-reduce. A timeout on the destroy cannot help, as no Python runs while the GIL
    is held. A process whose worker raised skips the barrier (spawn stops the others when it
    exits)."""
    import os
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    worker(rank, world, *args)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the group's destructor never runs (see above)
