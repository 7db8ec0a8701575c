"""The selection rules beyond the paper (issue 30): `filter_mode` truncate / verified and the
trust-ratio weight, on test_loss's hand-computed batch, and exact over two processes."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import run_in_gloo_group
from test_loss import MASK, OLD_LP, STUDENT_ENT, TEACHER_ENT, TEACHER_LP, _random_batch

from fire_opd.algorithm.objectives import fire_policy_loss
from fire_opd.algorithm.options import FireOptions
from fire_opd.algorithm.selection import compute_fire_advantages, first_divergence, prefix_through_divergence

# Teacher log-probs of the hand batch: [-.1, -.2, -.3], [-1, -2, pad], [-.5, -.5, -.5]. At
# percentile 50 the filter flags rollout 1 (score -1.5). With divergence_prob 0.5 (log -0.693)
# rollout 1's first token (-1) is its first divergence token, and no other token is one.
FLAGGED_ONE = dict(method="filter_only", percentile=50.0, divergence_prob=0.5)


def _loss(fire: FireOptions, **kwargs) -> tuple[float, dict]:
    loss, metrics = fire_policy_loss(OLD_LP, OLD_LP, TEACHER_LP, STUDENT_ENT, TEACHER_ENT, MASK, fire=fire, **kwargs)
    return float(loss), metrics


def test_divergence_helpers_by_hand():
    assert first_divergence(TEACHER_LP, MASK, 0.5).tolist() == [-1, 0, -1]
    assert first_divergence(TEACHER_LP, MASK, 0.2).tolist() == [-1, 1, -1]  # log 0.2 = -1.61
    prefix = prefix_through_divergence(TEACHER_LP, MASK, 0.5)
    assert prefix.tolist() == [[True, True, True], [True, False, False], [True, True, True]]
    # the padding token never counts, even when its log-prob is below the threshold
    assert not prefix_through_divergence(torch.full((1, 2), -9.0), torch.tensor([[True, False]]), 0.5)[0, 1]


def test_drop_truncate_and_verified_by_hand():
    # per-token loss at ratio 1 is -A = -log pi_T (old = 0); weights 1 (filter_only)
    dropped, metrics = _loss(FireOptions(**FLAGGED_ONE))
    assert dropped == pytest.approx(2.1 / 6) and "fire/truncated_ratio" not in metrics
    # truncate: rollout 1 keeps its first token (the divergence itself), not the one after it
    truncated, metrics = _loss(FireOptions(**FLAGGED_ONE, filter_mode="truncate"))
    assert truncated == pytest.approx(3.1 / 7)
    assert metrics["fire/truncated_ratio"] == pytest.approx(1 / 3)
    assert metrics["fire/keep_ratio"] == pytest.approx(2 / 3)  # the filter's own decision
    assert metrics["fire/token_keep_ratio"] == pytest.approx(7 / 8)
    # with the divergence on the last token the prefix is the whole rollout
    whole, _ = _loss(FireOptions(**{**FLAGGED_ONE, "divergence_prob": 0.2}, filter_mode="truncate"))
    assert whole == pytest.approx(5.1 / 8)
    # verified: the teacher still finishes rollout 1 correctly -> it stays whole; else truncated
    verified = FireOptions(**FLAGGED_ONE, filter_mode="verified")
    reliable, _ = _loss(verified, teacher_reliable=torch.tensor([False, True, False]))
    assert reliable == pytest.approx(5.1 / 8)
    unreliable, metrics = _loss(verified, teacher_reliable=torch.tensor([True, False, True]))
    assert unreliable == pytest.approx(3.1 / 7) and metrics["fire/truncated_ratio"] == pytest.approx(1 / 3)


def test_truncate_keeps_fire_weights_normalized_over_every_token():
    """fire's weights are divided by their mean over all response tokens, kept or not, as with drop."""
    drop = compute_fire_advantages(
        OLD_LP, TEACHER_LP, STUDENT_ENT, TEACHER_ENT, MASK, fire=FireOptions(percentile=50.0)
    )
    cut = compute_fire_advantages(
        OLD_LP, TEACHER_LP, STUDENT_ENT, TEACHER_ENT, MASK,
        fire=FireOptions(percentile=50.0, filter_mode="truncate", divergence_prob=0.5),
    )  # fmt: skip
    assert torch.equal(drop.token_weights[drop.loss_mask], cut.token_weights[drop.loss_mask])
    assert cut.loss_mask.tolist() == [[True, True, True], [True, False, False], [True, True, True]]
    assert float(cut.token_weights[1, 0]) == pytest.approx(1.5 / (19.625 / 8))  # raw weight 1.5, mean 19.625 / 8


def test_trust_ratio_by_hand():
    # old = 0: trust = min(pi_T, 1) = exp(log pi_T); opd's weights become it, not renormalized
    expected = sum(
        -math.exp(float(TEACHER_LP[i, t])) * float(TEACHER_LP[i, t]) for i in range(3) for t in range(3) if MASK[i, t]
    )
    loss, metrics = _loss(FireOptions(method="opd", trust_ratio=True))
    assert loss == pytest.approx(expected / 8)
    assert metrics["fire/weight_max"] == pytest.approx(math.exp(-0.1))
    # a token the teacher likes more than the student keeps weight 1
    old = torch.full_like(OLD_LP, -3.0)
    fire = compute_fire_advantages(
        old, TEACHER_LP, STUDENT_ENT, TEACHER_ENT, MASK, fire=FireOptions(method="opd", trust_ratio=True)
    )
    assert torch.equal(fire.token_weights[MASK], torch.ones(8))


def test_every_rollout_flagged_and_every_token_masked():
    # percentile 100 flags all but the best rollout; truncate still trains on their prefixes
    fire = compute_fire_advantages(
        OLD_LP, TEACHER_LP, STUDENT_ENT, TEACHER_ENT, MASK,
        fire=FireOptions(method="filter_only", percentile=100.0, filter_mode="truncate", divergence_prob=0.7),
    )  # fmt: skip
    assert fire.kept_rollouts.tolist() == [True, False, False]
    assert fire.loss_mask.tolist() == [[True, True, True], [True, False, False], [True, False, False]]
    empty = torch.zeros_like(MASK)
    for mode, extra in (("truncate", {}), ("verified", {"teacher_reliable": torch.zeros(3, dtype=torch.bool)})):
        loss, metrics = fire_policy_loss(
            OLD_LP, OLD_LP, TEACHER_LP, STUDENT_ENT, TEACHER_ENT, empty,
            fire=FireOptions(filter_mode=mode), **extra,
        )  # fmt: skip
        assert float(loss) == 0.0 and metrics["fire/truncated_ratio"] == 0.0


def test_bad_rule_options():
    with pytest.raises(ValueError, match="filter_mode must be one of drop, truncate, verified"):
        FireOptions(filter_mode="cut")
    with pytest.raises(ValueError, match="filter_mode 'truncate' acts on the rollouts the filter flags"):
        FireOptions(method="opd", filter_mode="truncate")
    with pytest.raises(ValueError, match="divergence_prob must be strictly between 0 and 1"):
        FireOptions(filter_mode="truncate", divergence_prob=0.0)
    with pytest.raises(ValueError, match="trust_ratio must be true or false"):
        FireOptions(trust_ratio="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="filter_mode='verified' needs teacher_reliable, a \\[3\\] bool tensor"):
        compute_fire_advantages(
            OLD_LP, TEACHER_LP, STUDENT_ENT, TEACHER_ENT, MASK, fire=FireOptions(filter_mode="verified")
        )


RULES = [
    FireOptions(percentile=40.0, filter_mode="truncate", divergence_prob=0.3),
    FireOptions(percentile=40.0, filter_mode="verified", divergence_prob=0.3, trust_ratio=True),
    FireOptions(method="reweight_only", trust_ratio=True),
]


def _reliable(batch: int) -> torch.Tensor:
    return torch.arange(batch) % 3 == 0


def _dist_worker(rank, world, results):

    _, old, teacher, ent_s, ent_t, mask = _random_batch(7, 6, 13, 0.8)
    part = slice(0, 3) if rank == 0 else slice(3, 7)  # uneven shards
    for index, fire in enumerate(RULES):
        out = compute_fire_advantages(
            old[part], teacher[part], ent_s[part], ent_t[part], mask[part], fire=fire,
            teacher_reliable=_reliable(7)[part],
        )  # fmt: skip
        results[(rank, index)] = (out.advantages, out.loss_mask, dict(out.metrics))


def test_rules_are_exact_over_two_processes():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    run_in_gloo_group(_dist_worker, 2, results)
    _, old, teacher, ent_s, ent_t, mask = _random_batch(7, 6, 13, 0.8)
    for index, fire in enumerate(RULES):
        whole = compute_fire_advantages(old, teacher, ent_s, ent_t, mask, fire=fire, teacher_reliable=_reliable(7))
        torch.testing.assert_close(torch.cat([results[(0, index)][0], results[(1, index)][0]]), whole.advantages)
        assert torch.equal(torch.cat([results[(0, index)][1], results[(1, index)][1]]), whole.loss_mask)
        for key, value in whole.metrics.items():
            assert results[(0, index)][2][key] == pytest.approx(value), (fire, key)
