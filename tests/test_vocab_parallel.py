"""Vocabulary-parallel statistics with 2 and 3 gloo processes against the unsharded oracle:
outputs, gradients (the rank's weight / bias shard, the complete hidden-state gradient), uneven
shards, targets in every shard, ignored rows, every divergence, and O(N) forward communication."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHARDS = {2: [9, 14], 3: [5, 11, 7]}  # uneven splits of V = 23
CASES = [  # (divergence, jsd_beta, head)
    (None, 0.5, {}),
    ("reverse_kl", 0.5, {}),
    ("forward_kl", 0.5, {"logit_scale": 0.7}),
    ("jsd", 0.3, {"logit_softcap": 4.0}),
    ("jsd", 0.5, {"bias": True}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(dtype, n=13, vocab=23, d_s=6, d_t=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[[2, 7]] = -100
    targets[0], targets[1], targets[3] = 0, vocab - 1, 10  # first, last and a middle shard

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return (randn(n, d_s), randn(vocab, d_s), randn(n, d_t), randn(vocab, d_t), randn(vocab), targets,
            randn(3, n))


# (backend, dtype, output tolerance, gradient tolerance): chunked in float64 checks the math to
# rounding; triton (interpreted here, float32 only) checks that its kernels run on a shard
BACKENDS = [("chunked", torch.float64, 1e-10, 1e-9), ("triton", torch.float32, 2e-5, 5e-5)]


def _worker(rank: int, world: int, port: int, backend: str) -> None:
    from fire_kernels import teacher_student_stats, token_stats

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sizes = SHARDS[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    _, dtype, out_tol, grad_tol = next(b for b in BACKENDS if b[0] == backend)
    sent = []
    original = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        sent.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    try:
        for case, (divergence, beta, head) in enumerate(CASES):
            s_h, s_w, t_h, t_w, bias, targets, upstream = _problem(dtype, seed=case)
            kwargs = {k: v for k, v in head.items() if k != "bias"}
            with_bias = head.get("bias", False)

            def run(h, w, b, tw, group, backend):
                if divergence is None:
                    lp, ent = token_stats(h, w, targets, bias=b, backend=backend, vocab_process_group=group, **kwargs)
                    return lp, ent, None
                out = teacher_student_stats(h, w, t_h, tw, targets, divergence=divergence, jsd_beta=beta, bias=b,
                                            backend=backend, vocab_process_group=group, **kwargs)
                return out.student_logprob, out.student_entropy, out.divergence

            full = [x.clone().requires_grad_(True) for x in (s_h, s_w, bias)]
            ref = run(full[0], full[1], full[2] if with_bias else None, t_w, None, "reference")
            ref_loss = sum((u * r).sum() for u, r in zip(upstream, ref) if r is not None)
            ref_grads = torch.autograd.grad(ref_loss, full[:3] if with_bias else full[:2])

            mine = [s_h.clone().requires_grad_(True), s_w[lo:hi].clone().requires_grad_(True),
                    bias[lo:hi].clone().requires_grad_(True)]
            sent.clear()
            dist.all_reduce = recording
            out = run(mine[0], mine[1], mine[2] if with_bias else None, t_w[lo:hi], dist.group.WORLD, backend)
            dist.all_reduce = original
            forward_floats = list(sent)
            for got, want in zip(out, ref):
                if want is not None:
                    torch.testing.assert_close(got, want, rtol=out_tol, atol=out_tol)
            loss = sum((u * r).sum() for u, r in zip(upstream, out) if r is not None)
            grads = torch.autograd.grad(loss, mine[:3] if with_bias else mine[:2])
            torch.testing.assert_close(grads[0], ref_grads[0], rtol=grad_tol, atol=grad_tol)  # complete dL/dh
            torch.testing.assert_close(grads[1], ref_grads[1][lo:hi], rtol=grad_tol, atol=grad_tol)  # shard's dL/dW
            if with_bias:
                torch.testing.assert_close(grads[2], ref_grads[2][lo:hi], rtol=grad_tol, atol=grad_tol)
            # O(N), never O(N V): maxima [2, N], the merged sums [7, N], the JSD's two sums [2, N]
            n = s_h.shape[0]
            assert max(forward_floats) <= 7 * n and sum(forward_floats) <= 11 * n, (case, forward_floats)
    finally:
        dist.all_reduce = original
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [b[0] for b in BACKENDS])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_vocabulary_equals_the_unsharded_oracle(world, backend):
    mp.spawn(_worker, args=(world, _free_port(), backend), nprocs=world, join=True)


def test_vocab_parallel_refuses_the_materializing_reference_backend():
    from fire_kernels import token_stats

    with pytest.raises(ValueError, match="vocab_process_group needs a streaming backend"):
        token_stats(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), backend="reference",
                    vocab_process_group=object())
