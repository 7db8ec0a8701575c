"""Vocabulary-parallel statistics with 2 and 3 gloo processes against the unsharded oracle:
outputs, gradients (the rank's weight / bias shard, the complete hidden-state gradient), uneven
shards, targets in every shard, ignored rows, every divergence, and O(N) forward communication."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _helpers import run_in_gloo_group

SHARDS = {2: [9, 14], 3: [5, 11, 7]}  # uneven splits of V = 23
CASES = [  # (divergence, jsd_beta, head)
    (None, 0.5, {}),
    ("reverse_kl", 0.5, {}),
    ("forward_kl", 0.5, {"logit_scale": 0.7}),
    ("jsd", 0.3, {"logit_softcap": 4.0}),
    ("jsd", 0.5, {"bias": True}),
]


def _problem(dtype, n=13, vocab=23, d_s=6, d_t=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[[2, 7]] = -100
    targets[0], targets[1], targets[3] = 0, vocab - 1, 10  # first, last and a middle shard

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return (randn(n, d_s), randn(vocab, d_s), randn(n, d_t), randn(vocab, d_t), randn(vocab), targets, randn(3, n))


# (backend, dtype, output tolerance, gradient tolerance): chunked in float64 checks the math to
# rounding; triton (interpreted here, float32 only) checks that its kernels run on a shard
BACKENDS = [("chunked", torch.float64, 1e-10, 1e-9), ("triton", torch.float32, 2e-5, 5e-5)]


def _worker(rank: int, world: int, backend: str) -> None:
    from fire_kernels import LMHead, teacher_student_stats, token_stats

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
                    lp, ent = token_stats(
                        h, LMHead(w, b, **kwargs), targets, backend=backend, vocab_process_group=group
                    )
                    return lp, ent, None
                out = teacher_student_stats(
                    h,
                    LMHead(w, b, **kwargs),
                    t_h,
                    tw,
                    targets,
                    divergence=divergence,
                    jsd_beta=beta,
                    backend=backend,
                    vocab_process_group=group,
                )
                return out.student_log_prob, out.student_entropy, out.divergence

            full = [x.clone().requires_grad_(True) for x in (s_h, s_w, bias)]
            ref = run(full[0], full[1], full[2] if with_bias else None, t_w, None, "reference")
            ref_loss = sum((u * r).sum() for u, r in zip(upstream, ref) if r is not None)
            ref_grads = torch.autograd.grad(ref_loss, full[:3] if with_bias else full[:2])

            mine = [
                s_h.clone().requires_grad_(True),
                s_w[lo:hi].clone().requires_grad_(True),
                bias[lo:hi].clone().requires_grad_(True),
            ]
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


@pytest.mark.parametrize("backend", [b[0] for b in BACKENDS])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_vocabulary_equals_the_unsharded_oracle(world, backend):
    run_in_gloo_group(_worker, world, backend)


def test_vocab_parallel_refuses_the_materializing_reference_backend():
    from fire_kernels import token_stats

    with pytest.raises(ValueError, match="vocab_process_group needs a streaming backend"):
        token_stats(
            torch.randn(2, 3),
            torch.randn(4, 3),
            torch.tensor([0, 1]),
            backend="reference",
            vocab_process_group=object(),
        )


def _fused_update_worker(rank: int, world: int) -> None:
    from fire_kernels import LMHead
    from fire_kernels.fused_update import linear_divergence_update, linear_log_prob_update

    sizes = SHARDS[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    s_h, s_w, t_h, t_w, bias, targets, upstream = _problem(torch.float64, seed=7)
    coefficient = upstream[0].abs()

    def grad_fn(lp, rows):  # loss = sum_t c_t lp_t^2 / 2
        return (coefficient[rows] * lp * lp / 2).sum(), coefficient[rows] * lp

    for reduce in (True, False):
        whole = linear_log_prob_update(s_h, LMHead(s_w, bias), targets, grad_fn)
        mine = linear_log_prob_update(
            s_h,
            LMHead(s_w[lo:hi], bias[lo:hi]),
            targets,
            grad_fn,
            vocab_process_group=dist.group.WORLD,
            reduce_hidden_grad=reduce,
        )
        for a, b in (
            (mine.log_prob, whole.log_prob),
            (mine.loss, whole.loss),
            (mine.grad_weight, whole.grad_weight[lo:hi]),
            (mine.grad_bias, whole.grad_bias[lo:hi]),
        ):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        grad_hidden = mine.grad_hidden if reduce else _summed(mine.grad_hidden)
        torch.testing.assert_close(grad_hidden, whole.grad_hidden, rtol=1e-9, atol=1e-10)
        for divergence in ("reverse_kl", "forward_kl", "jsd"):
            whole = linear_divergence_update(
                s_h, s_w, t_h, t_w, targets, coefficient, divergence=divergence, jsd_beta=0.3
            )
            mine = linear_divergence_update(
                s_h,
                s_w[lo:hi],
                t_h,
                t_w[lo:hi],
                targets,
                coefficient,
                divergence=divergence,
                jsd_beta=0.3,
                vocab_process_group=dist.group.WORLD,
                reduce_hidden_grad=reduce,
            )
            for a, b in (
                (mine.divergence, whole.divergence),
                (mine.loss, whole.loss),
                (mine.grad_weight, whole.grad_weight[lo:hi]),
            ):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
            grad_hidden = mine.grad_hidden if reduce else _summed(mine.grad_hidden)
            torch.testing.assert_close(grad_hidden, whole.grad_hidden, rtol=1e-9, atol=1e-10)
    # every row ignored (a micro-batch whose rollouts were all filtered) and no rows at all
    for rows in (s_h.shape[0], 0):
        ignored = torch.full((rows,), -100)
        out = linear_divergence_update(
            s_h[:rows],
            s_w[lo:hi],
            t_h[:rows],
            t_w[lo:hi],
            ignored,
            coefficient[:rows],
            vocab_process_group=dist.group.WORLD,
        )
        assert float(out.loss) == 0.0 and not out.grad_hidden.any() and not out.grad_weight.any()


def _summed(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


@pytest.mark.parametrize("world", [2, 3])
def test_fused_updates_on_a_sharded_vocabulary_equal_the_whole_one(world):
    """The trainer's fused sweeps (gradients formed in the forward) on vocabulary shards: the same
    per-token values and loss as one process, the shard's weight and bias gradients, and dL/dh
    complete (reduce_hidden_grad) or as the shards' parts that sum to it."""
    run_in_gloo_group(_fused_update_worker, world)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"parallel": "fsdp"}, "parallel.vocab: true runs with parallel.student: ddp"),
        ({"fused_update": False}, "parallel.vocab: true needs runtime.fused_update: true"),
        ({"stats_scope": "micro_batch"}, "parallel.vocab: true needs loss.stats_scope: batch"),
    ],
)
def test_vocab_parallel_config_errors_say_what_to_change(overrides, message):
    from fire_opd.train.config import TrainConfig, dotted

    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"parallel.vocab": True, **dotted(overrides)})


def _single_process_worker(rank: int, world: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fire_opd.parallel.sharded_head import ShardedLMHead, shard_rows

    assert [shard_rows(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    config = LlamaConfig(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with pytest.raises(ValueError, match="ties its lm_head to its input embeddings"):
        ShardedLMHead.shard(LlamaForCausalLM(config), "the student", dist.group.WORLD)
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    hidden = torch.randn(2, 3, 8)
    whole = model.lm_head(hidden)
    head = ShardedLMHead.shard(model, "the student", dist.group.WORLD)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), whole.detach())
    with pytest.raises(RuntimeError, match="generation only"):
        head(hidden.requires_grad_(True))


def test_sharded_head_refuses_tied_embeddings_and_gives_whole_logits():
    run_in_gloo_group(_single_process_worker, 1)
