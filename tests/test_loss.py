"""The FiRe-OPD loss: hand-computed cases, properties, the hidden-state path, the weights kernel."""

from __future__ import annotations

import pytest
import torch
from _helpers import run_in_gloo_group
from hypothesis import given
from hypothesis import strategies as st

from fire_kernels.fire_weights import fire_row_stats
from fire_opd import (
    FireOPDLoss,
    clipped_surrogate,
    compute_fire_advantages,
    fire_dense_loss,
    fire_policy_loss,
    fire_policy_loss_from_hidden,
    loss_normalizer,
    route_rows,
    scatter_rows,
)
from fire_opd.algorithm.options import FireOptions
from fire_opd.ops.loss_from_hidden import response_token_stats

# ----------------------------------------------------------------------------- a hand-computed batch
# Three rollouts, three tokens, the middle rollout has one padding token.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
TEACHER_LP = torch.tensor([[-0.1, -0.2, -0.3], [-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
TEACHER_ENT = torch.tensor([[0.0, 1.0, 2.0], [4.0, 2.0, 9.0], [1.0, 1.0, 1.0]])  # 9.0 sits on padding
STUDENT_ENT = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 7.0], [0.0, 2.0, 1.0]])
OLD_LP = torch.zeros(3, 3)
# By hand: max H^T = 4, max H^S = 2 over valid tokens; w = (1 + c)(1 + u):
RAW_W = [[4.0, 1.75, 2.25], [1.5, 2.25, None], [1.75, 3.5, 2.625]]
W_MEAN = 19.625 / 8
# Rollout scores -0.2, -1.5, -0.5; the median (percentile 50) is -0.5: rollouts 0 and 2 stay.


def _hand_loss(rows, weighted):
    num, count = 0.0, 0
    for i in rows:
        for t in range(3):
            if RAW_W[i][t] is None:
                continue
            w = RAW_W[i][t] / W_MEAN if weighted else 1.0
            num += -w * float(TEACHER_LP[i, t])  # ratio 1: per-token loss is -A^
            count += 1
    return num / count


@pytest.mark.parametrize(
    "method,expected",
    [
        ("opd", _hand_loss([0, 1, 2], False)),  # 5.1 / 8
        ("filter_only", _hand_loss([0, 2], False)),  # 2.1 / 6
        ("reweight_only", _hand_loss([0, 1, 2], True)),
        ("fire", _hand_loss([0, 2], True)),
        # hard_token: token scores' median is 2.25; tokens with w >= 2.25 have A = -.1, -.3, -2, -.5, -.5
        ("hard_token", 3.4 / 5),
    ],
)
def test_hand_computed_methods(method, expected):
    log_prob = OLD_LP.clone().requires_grad_()
    loss, metrics = fire_policy_loss(
        log_prob,
        OLD_LP,
        TEACHER_LP,
        STUDENT_ENT,
        TEACHER_ENT,
        MASK,
        fire=FireOptions(method=method, percentile=50.0),
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(log_prob.grad[~MASK] == 0)
    if method in ("fire", "filter_only"):
        assert metrics["fire/keep_ratio"] == pytest.approx(2 / 3)
        assert metrics["fire/threshold"] == pytest.approx(-0.5)
        assert torch.all(log_prob.grad[1] == 0)


def test_hand_computed_weights_and_metrics():
    fire = compute_fire_advantages(
        OLD_LP,
        TEACHER_LP,
        STUDENT_ENT,
        TEACHER_ENT,
        MASK,
        fire=FireOptions(method="reweight_only"),
    )
    expected = torch.tensor([[w / W_MEAN if w is not None else 0.0 for w in row] for row in RAW_W])
    torch.testing.assert_close(fire.token_weights, expected)
    assert fire.metrics["fire/weight_mean"] == pytest.approx(1.0)
    assert fire.metrics["fire/weight_max"] == pytest.approx(4.0 / W_MEAN)
    # c over valid tokens: 1, .75, .5, 0, .5, .75, .75, .75 -> mean 5 / 8
    assert fire.metrics["fire/teacher_confidence_mean"] == pytest.approx(5.0 / 8)
    assert fire.metrics["fire/student_confusion_mean"] == pytest.approx(4.0 / 8)
    assert fire.metrics["fire/reverse_kl"] == pytest.approx(5.1 / 8)


def test_clipping_hand_case():
    # A > 0 and r = e^0.5 > 1.2: clipped, no gradient. A < 0 and r > 1.2: unclipped, gradient -A r.
    log_prob = torch.tensor([[0.5, 0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    loss, metrics = clipped_surrogate(log_prob, torch.zeros(1, 2), adv, torch.ones(1, 2, dtype=torch.bool))
    r = torch.exp(torch.tensor(0.5)).item()
    assert loss.item() == pytest.approx((-1.0 * 1.2 + r) / 2)
    loss.backward()
    assert log_prob.grad[0, 0].item() == 0.0
    assert log_prob.grad[0, 1].item() == pytest.approx(r / 2)
    assert metrics["fire/clip_frac"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", (0.1 + 0.2 + 0.3 + 0.5 * 3) / 6),
        ("seq-mean-token-mean", ((0.6 / 3) + (1.5 / 3)) / 2),
        ("seq-mean-token-sum", (0.6 + 1.5) / 2),
    ],
)
def test_loss_aggregation_modes(mode, expected):
    loss, _ = fire_policy_loss(
        OLD_LP.clone(),
        OLD_LP,
        TEACHER_LP,
        STUDENT_ENT,
        TEACHER_ENT,
        MASK,
        fire=FireOptions(method="filter_only", percentile=50.0),
        loss_agg_mode=mode,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- properties

batches = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 8),
        "length": st.integers(1, 9),
        "seed": st.integers(0, 10_000),
        "mask_p": st.sampled_from([0.0, 0.5, 0.9, 1.0]),
        "method": st.sampled_from(["opd", "fire", "filter_only", "reweight_only", "hard_token"]),
        "percentile": st.sampled_from([0.0, 20.0, 50.0, 100.0]),
    }
)


def _random_batch(b, t, seed, mask_p):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=gen) < mask_p
    old = -torch.rand(b, t, generator=gen) * 3
    teacher = -torch.rand(b, t, generator=gen) * 3
    ent_s = torch.rand(b, t, generator=gen) * 4
    ent_t = torch.rand(b, t, generator=gen) * 4
    log_prob = (old + 0.3 * torch.randn(b, t, generator=gen)).requires_grad_()
    return log_prob, old, teacher, ent_s, ent_t, mask


@given(cfg=batches)
def test_properties(cfg):
    log_prob, old, teacher, ent_s, ent_t, mask = _random_batch(cfg["batch"], cfg["length"], cfg["seed"], cfg["mask_p"])
    fire = compute_fire_advantages(
        old,
        teacher,
        ent_s,
        ent_t,
        mask,
        fire=FireOptions(method=cfg["method"], percentile=cfg["percentile"]),
    )
    loss, _ = clipped_surrogate(log_prob, old, fire.advantages, fire.loss_mask)
    assert torch.isfinite(loss)
    loss.backward()
    # Dropped rollouts and padding contribute exactly zero loss and gradient.
    assert torch.all(log_prob.grad[~fire.loss_mask] == 0)
    assert torch.all(log_prob.grad[~fire.kept_rollouts] == 0)
    has_tokens = mask.any(-1)
    if cfg["method"] in ("fire", "filter_only"):
        assert bool(fire.kept_rollouts[has_tokens].any()) == bool(has_tokens.any())  # the best rollout always stays
        if cfg["percentile"] == 0.0:
            assert torch.equal(fire.kept_rollouts, has_tokens)
    else:
        assert torch.equal(fire.kept_rollouts, has_tokens)
    if cfg["method"] == "reweight_only" and mask.any():
        assert fire.token_weights[mask].mean().item() == pytest.approx(1.0, rel=1e-5)
        # raw w lies in [1, (1 + alpha)(1 + beta)] = [1, 4], so w / mean(w) lies in [1/4, 4]
        assert 0.25 - 1e-6 <= fire.token_weights[mask].min().item() <= fire.token_weights[mask].max().item() <= 4 + 1e-6
    if not mask.any():
        assert loss.item() == 0.0


@given(cfg=batches)
def test_opd_is_the_plain_reverse_kl_policy_gradient(cfg):
    log_prob, old, teacher, ent_s, ent_t, mask = _random_batch(cfg["batch"], cfg["length"], cfg["seed"], cfg["mask_p"])
    loss, _ = fire_policy_loss(
        log_prob,
        old,
        teacher,
        ent_s,
        ent_t,
        mask,
        fire=FireOptions(method="opd"),
    )
    adv = teacher - old
    ratio = torch.exp(log_prob.detach() - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    expected = per_token[mask].sum() / max(int(mask.sum()), 1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_all_masked_and_all_filtered_batches_give_finite_zero_loss():
    log_prob, old, teacher, ent_s, ent_t, _ = _random_batch(4, 5, 0, 1.0)
    for method in ("fire", "opd", "hard_token"):
        loss, metrics = fire_policy_loss(
            log_prob,
            old,
            teacher,
            ent_s,
            ent_t,
            torch.zeros(4, 5, dtype=torch.bool),
            fire=FireOptions(method=method),
        )
        assert loss.item() == 0.0 and torch.isfinite(loss)
        loss.backward()
        assert torch.all(log_prob.grad == 0)
        assert metrics["fire/keep_ratio"] == 0.0
    # Every rollout filtered (an empty loss mask after the filter): still a finite zero.
    none_kept = torch.zeros(4, 5, dtype=torch.bool)
    loss, _ = clipped_surrogate(
        log_prob, old, teacher - old, none_kept, normalizer=loss_normalizer(none_kept, "token-mean")
    )
    assert loss.item() == 0.0


def test_empty_batch():
    empty = torch.zeros(0, 7)
    loss, metrics = fire_policy_loss(
        empty.clone().requires_grad_(), empty, empty, empty, empty, torch.zeros(0, 7, dtype=torch.bool)
    )
    assert loss.item() == 0.0 and metrics["fire/keep_ratio"] == 0.0


def test_micro_batches_with_global_normalizer_equal_the_whole_batch():
    log_prob, old, teacher, ent_s, ent_t, mask = _random_batch(8, 6, 3, 0.8)
    fire = compute_fire_advantages(old, teacher, ent_s, ent_t, mask)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        whole, _ = clipped_surrogate(log_prob, old, fire.advantages, fire.loss_mask, loss_agg_mode=mode)
        (g_whole,) = torch.autograd.grad(whole, log_prob)
        norm = loss_normalizer(fire.loss_mask, mode)
        parts = [
            clipped_surrogate(
                log_prob[s], old[s], fire.advantages[s], fire.loss_mask[s], loss_agg_mode=mode, normalizer=norm
            )[0]
            for s in (slice(0, 3), slice(3, 8))
        ]
        (g_parts,) = torch.autograd.grad(sum(parts), log_prob)
        torch.testing.assert_close(sum(parts), whole)
        torch.testing.assert_close(g_parts, g_whole)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs():
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="method must be one of"):
        fire_policy_loss(
            x,
            x,
            x,
            x,
            x,
            mask,
            fire=FireOptions(method="grpo"),
        )
    with pytest.raises(ValueError, match="percentile"):
        fire_policy_loss(
            x,
            x,
            x,
            x,
            x,
            mask,
            fire=FireOptions(percentile=120),
        )
    with pytest.raises(ValueError, match="teacher_entropy must have the shape"):
        fire_policy_loss(x, x, x, x, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fire_policy_loss(x, x, x, x, x, mask, loss_agg_mode="sum")
    with pytest.raises(ValueError, match="response_mask must be boolean"):
        fire_policy_loss(x, x, x, x, x, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="clip_ratio"):
        fire_policy_loss(x, x, x, x, x, mask, clip_ratio=0)


def test_routing():
    routes = route_rows(["a", "b", "a", None], ["a", "b"], default="b")
    assert routes["a"].tolist() == [0, 2] and routes["b"].tolist() == [1, 3]
    merged = scatter_rows({"a": (torch.tensor([1.0, 2.0]),), "b": (torch.tensor([3.0, 4.0]),)}, routes, 4)
    assert merged[0].tolist() == [1.0, 3.0, 2.0, 4.0]
    with pytest.raises(KeyError, match="row 1 names teacher 'c'"):
        route_rows(["a", "c"], ["a", "b"])
    with pytest.raises(KeyError, match="row 0 has no teacher key"):
        route_rows([None], ["a"])


# ----------------------------------------------------------------------------- kernels in the loss


@pytest.mark.parametrize("shape", [(5, 7), (3, 1500), (1, 1)])
def test_fire_weights_kernel_matches_torch(shape):
    gen = torch.Generator().manual_seed(0)
    b, t = shape
    args = {
        "teacher_log_prob": -torch.rand(b, t, generator=gen),
        "teacher_entropy": torch.rand(b, t, generator=gen) * 3,
        "student_entropy": torch.rand(b, t, generator=gen),
        "mask": (torch.rand(b, t, generator=gen) < 0.7).float(),
    }
    got = fire_row_stats(**args, alpha=0.5, beta=2.0, backend="triton")
    want = fire_row_stats(**args, alpha=0.5, beta=2.0, backend="torch")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_hidden_state_path_equals_per_token_path(backend):
    gen = torch.Generator().manual_seed(1)
    b, t, d_s, d_t, vocab = 4, 5, 12, 16, 37
    s_h = torch.randn(b, t, d_s, generator=gen, requires_grad=True)
    s_w = (torch.randn(vocab, d_s, generator=gen) * 0.5).requires_grad_()
    t_h, t_w = torch.randn(b, t, d_t, generator=gen), torch.randn(vocab, d_t, generator=gen) * 0.5
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.8
    old = -torch.rand(b, t, generator=gen) * 4

    loss_h, metrics_h = fire_policy_loss_from_hidden(
        s_h,
        s_w,
        t_h,
        t_w,
        ids,
        mask,
        old,
        backend=backend,
        fire=FireOptions(method="fire", percentile=30.0),
    )
    g_h = torch.autograd.grad(loss_h, (s_h, s_w))

    # Per-token path: materialized logits and plain PyTorch.
    z = torch.log_softmax(s_h @ s_w.t(), -1)
    u = torch.log_softmax(t_h @ t_w.t(), -1)
    lp = z.gather(-1, ids[..., None]).squeeze(-1)
    ent_s = -(z.exp() * z).sum(-1)
    lp_t, ent_t = u.gather(-1, ids[..., None]).squeeze(-1), -(u.exp() * u).sum(-1)
    loss_p, metrics_p = fire_policy_loss(
        lp,
        old,
        lp_t,
        ent_s.detach(),
        ent_t,
        mask,
        fire=FireOptions(method="fire", percentile=30.0),
    )
    g_p = torch.autograd.grad(loss_p, (s_h, s_w))
    torch.testing.assert_close(loss_h, loss_p, rtol=1e-5, atol=1e-6)
    for a, b_ in zip(g_h, g_p):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)
    assert metrics_h["fire/keep_ratio"] == metrics_p["fire/keep_ratio"]

    # The update-step module with precomputed advantages gives the same loss.
    fire = compute_fire_advantages(
        old,
        lp_t,
        ent_s.detach(),
        ent_t,
        mask,
        fire=FireOptions(method="fire", percentile=30.0),
    )
    loss_m, _ = FireOPDLoss(backend=backend).sampled(s_h, s_w, ids, old, fire.advantages, fire.loss_mask)
    torch.testing.assert_close(loss_m, loss_p, rtol=1e-5, atol=1e-6)


def test_response_token_stats_shapes():
    h, w = torch.randn(2, 3, 4), torch.randn(9, 4)
    ids, mask = torch.randint(0, 9, (2, 3)), torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    out = response_token_stats(h, w, ids, mask)
    assert out.student_log_prob.shape == (2, 3) and out.student_log_prob[1, 2] == 0
    with pytest.raises(ValueError, match="student_hidden must be"):
        response_token_stats(torch.randn(2, 4, 4), w, ids, mask)


# ----------------------------------------------------------------------------- distributed


def _dist_worker(rank, world, results):

    log_prob, old, teacher, ent_s, ent_t, mask = _random_batch(6, 5, 11, 0.8)
    part = slice(0, 2) if rank == 0 else slice(2, 6)  # uneven shards
    fire = compute_fire_advantages(
        old[part],
        teacher[part],
        ent_s[part],
        ent_t[part],
        mask[part],
        fire=FireOptions(percentile=40.0),
    )
    results[rank] = (fire.advantages, fire.kept_rollouts, fire.metrics["fire/keep_ratio"], fire.threshold)


def test_statistics_span_data_parallel_ranks():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    run_in_gloo_group(_dist_worker, 2, results)
    _, old, teacher, ent_s, ent_t, mask = _random_batch(6, 5, 11, 0.8)
    whole = compute_fire_advantages(
        old,
        teacher,
        ent_s,
        ent_t,
        mask,
        fire=FireOptions(percentile=40.0),
    )
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), whole.advantages)
    assert torch.equal(torch.cat([results[0][1], results[1][1]]), whole.kept_rollouts)
    assert results[0][2] == pytest.approx(whole.metrics["fire/keep_ratio"])
    assert results[0][3] == pytest.approx(whole.threshold) and results[1][3] == pytest.approx(whole.threshold)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_fused_update_equals_autograd_surrogate(backend, mode):
    """The fused student update (gradients formed in the forward sweep) against autograd
    through token_stats + clipped_surrogate, with ratios far enough from 1 to clip."""
    gen = torch.Generator().manual_seed(4)
    b, t, d, vocab = 4, 6, 10, 41
    hidden = torch.randn(b, t, d, generator=gen, requires_grad=True)
    weight = (torch.randn(vocab, d, generator=gen) * 0.5).requires_grad_()
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.8
    with torch.no_grad():
        lp_now = response_token_stats(hidden, weight, ids, mask, backend="reference").student_log_prob
    old = lp_now + 0.4 * torch.randn(b, t, generator=gen)  # ratios well outside [0.8, 1.2]
    adv = torch.randn(b, t, generator=gen)
    losses, grads = [], []
    for fused in (True, False):
        fn = FireOPDLoss(
            clip_ratio=0.2, loss_agg_mode=mode, backend=backend if fused else "reference", fused_update=fused
        )
        loss, metrics = fn.sampled(hidden, weight, ids, old, adv, mask, normalizer=3.0)
        losses.append(loss)
        grads.append(torch.autograd.grad(2.0 * loss, (hidden, weight)))
        assert 0 < metrics["fire/clip_frac"] < 1
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- options beyond the paper


def test_filter_scores_rank_by_their_own_trajectory_score():
    # Mean teacher log-probs -0.5, -0.6, -0.1 (row 1 has two tokens), sums -1.5, -1.2, -0.3: at the
    # median the paper's score keeps rows 0 and 2, the unnormalized sum keeps rows 1 and 2.
    teacher = torch.tensor([[-0.5, -0.5, -0.5], [-0.6, -0.6, 0.0], [-0.1, -0.1, -0.1]])
    keep = {
        score: compute_fire_advantages(
            OLD_LP,
            teacher,
            STUDENT_ENT,
            TEACHER_ENT,
            MASK,
            fire=FireOptions(method="filter_only", percentile=50.0, filter_score=score),
        ).kept_rollouts.tolist()
        for score in ("teacher_mean", "teacher_sum")
    }
    assert keep == {"teacher_mean": [True, False, True], "teacher_sum": [False, True, True]}
    # advantage_mean ranks mean(log pi_T - log pi_old): 0, 0, -0.5 here, so row 2 goes although
    # the teacher likes it best (the student was even more sure of it).
    old = torch.tensor([[-0.5, -0.5, -0.5], [-0.6, -0.6, 0.0], [0.4, 0.4, 0.4]])
    fire = compute_fire_advantages(
        old,
        teacher,
        STUDENT_ENT,
        TEACHER_ENT,
        MASK,
        fire=FireOptions(method="fire", percentile=50.0, filter_score="advantage_mean"),
    )
    assert fire.kept_rollouts.tolist() == [True, True, False]
    assert fire.threshold == pytest.approx(0.0)


@pytest.mark.parametrize("method", ["opd", "reweight_only"])
def test_teacher_confidence_gate_drops_unreliable_tokens(method):
    # teacher confidence c = 1 - H^T / 4 on valid tokens: [1, .75, .5], [0, .5, -], [.75, .75, .75]
    gated = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    log_prob = OLD_LP.clone().requires_grad_()
    loss, metrics = fire_policy_loss(
        log_prob,
        OLD_LP,
        TEACHER_LP,
        STUDENT_ENT,
        TEACHER_ENT,
        MASK,
        fire=FireOptions(method=method, teacher_confidence_gate=0.6),
    )
    weights = [
        [(RAW_W[i][t] / W_MEAN if method == "reweight_only" else 1.0) if gated[i, t] else 0.0 for t in range(3)]
        for i in range(3)
    ]
    expected = sum(-w * float(TEACHER_LP[i, t]) for i, row in enumerate(weights) for t, w in enumerate(row)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["fire/token_keep_ratio"] == pytest.approx(5 / 8)
    loss.backward()
    assert torch.all(log_prob.grad[~gated] == 0) and torch.all(log_prob.grad[gated] != 0)
    # the dense objective gates the same tokens
    divergence = torch.rand(3, 3, requires_grad=True)
    dense, _ = fire_dense_loss(
        divergence,
        OLD_LP,
        TEACHER_LP,
        STUDENT_ENT,
        TEACHER_ENT,
        MASK,
        fire=FireOptions(method=method, teacher_confidence_gate=0.6),
    )
    dense.backward()
    assert torch.all(divergence.grad[~gated] == 0) and torch.all(divergence.grad[gated] > 0)


def test_bad_filter_options():
    with pytest.raises(ValueError, match="filter_score must be one of"):
        compute_fire_advantages(
            OLD_LP,
            TEACHER_LP,
            STUDENT_ENT,
            TEACHER_ENT,
            MASK,
            fire=FireOptions(filter_score="median"),
        )
    with pytest.raises(ValueError, match=r"teacher_confidence_gate must be in \[0, 1\]"):
        compute_fire_advantages(
            OLD_LP,
            TEACHER_LP,
            STUDENT_ENT,
            TEACHER_ENT,
            MASK,
            fire=FireOptions(teacher_confidence_gate=1.5),
        )


def test_group_scope_filters_each_prompts_rollouts_by_its_own_quantile():
    """filter_scope="group": each prompt's rollouts are ranked among themselves. Prompt 0's three
    rollouts all score above prompt 1's; at p = 50 the batch quantile drops all of prompt 1 and
    one of prompt 0's, the group quantile the lowest rollout of each prompt."""
    scores = torch.tensor([-0.1, -0.2, -0.3, -2.0, -1.0, -3.0])  # mean teacher log-prob per rollout
    teacher_log_prob = scores[:, None].expand(6, 4).clone()
    old = torch.full((6, 4), -1.0)
    entropy = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    mask = torch.ones(6, 4, dtype=torch.bool)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    by_group = compute_fire_advantages(
        old, teacher_log_prob, entropy, entropy, mask, fire=FireOptions(percentile=50.0, filter_scope="group"),
        group_ids=groups,
    )  # fmt: skip
    by_batch = compute_fire_advantages(old, teacher_log_prob, entropy, entropy, mask, fire=FireOptions(percentile=50.0))
    assert by_group.kept_rollouts.tolist() == [True, True, False, True, True, False]
    assert by_batch.kept_rollouts.tolist() == [True, True, True, False, False, False]
    # weights are normalized over the whole batch either way
    torch.testing.assert_close(by_group.token_weights[0], by_batch.token_weights[0])
    with pytest.raises(ValueError, match="filter_scope='group' needs group_ids"):
        compute_fire_advantages(old, teacher_log_prob, entropy, entropy, mask, fire=FireOptions(filter_scope="group"))
