"""FiRe-OPD as a verl 0.9.1 distillation loss: verl's own code on a synthetic micro-batch built
the way verl builds it (no-padding model outputs, nested teacher top-k), against fire_policy_loss,
and the substitutes for what verl does not give, each with its error bound.

verl requires transformers<5.11, so it lives in its own virtualenv (.venv-verl); `make test` runs
this file there (and leaves it out of the main run), so it is never skipped in CI.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _helpers import run_in_gloo_group

from fire_opd.algorithm.options import FireOptions

verl = pytest.importorskip("verl")  # `import verl` loads the plugin through its entry point

from tensordict import TensorDict  # noqa: E402
from verl.trainer.distillation.losses import (
    DISTILLATION_LOSS_REGISTRY,
    distillation_loss,  # noqa: E402
    get_distillation_loss_settings,
)
from verl.workers.config import DistillationConfig  # noqa: E402

from fire_opd.algorithm.objectives import fire_policy_loss  # noqa: E402
from fire_opd.algorithm.selection import compute_fire_advantages  # noqa: E402
from fire_opd.integrations.verl import (
    FireDistillationLossConfig,
    denominator_correction,
    fire_linear_cross_entropy,
    fire_options,
    teacher_stats_from_topk,
    use_fire_linear_cross_entropy,
)


def test_the_plugin_registers_through_verls_entry_point():
    """`import verl` alone (no import of fire_opd) registers loss_mode=fire_opd with top-k teacher outputs."""
    assert DISTILLATION_LOSS_REGISTRY["fire_opd"].__module__ == "fire_opd.integrations.verl"
    assert get_distillation_loss_settings("fire_opd").use_topk
    with pytest.raises(ValueError, match="fire_percentile must be in"):
        FireDistillationLossConfig(loss_mode="fire_opd", fire_percentile=200.0)


def test_fire_fields_come_from_verls_yaml_through_target():
    """The documented override: verl's own distillation.yaml, `_target_` pointed at our config
    class and `+fire_percentile=...`, instantiated the way verl instantiates its configs."""
    import os

    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    cfg = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/distillation/distillation.yaml"))
    loss_cfg = cfg.distillation_loss
    loss_cfg._target_ = "fire_opd.integrations.verl.FireDistillationLossConfig"
    loss_cfg.loss_mode, loss_cfg.use_policy_gradient, loss_cfg.fire_percentile = "fire_opd", True, 35.0
    config = omega_conf_to_dataclass(loss_cfg)
    assert isinstance(config, FireDistillationLossConfig)
    assert config.fire_percentile == 35.0 and config.fire_method == "fire" and config.loss_settings.use_topk
    # every FireOptions field is declared, generated from FireOptions (its default; str for OmegaConf)
    import dataclasses

    from fire_opd.algorithm.options import FireOptions

    declared = {f.name: f for f in dataclasses.fields(FireDistillationLossConfig)}
    for option in dataclasses.fields(FireOptions):
        assert declared[f"fire_{option.name}"].default == option.default
    assert declared["fire_method"].type is str
    with pytest.raises(ValueError, match="fire_filter_scope must be batch in verl"):
        FireDistillationLossConfig(loss_mode="fire_opd", fire_filter_scope="group")
    truncate = FireDistillationLossConfig(loss_mode="fire_opd", fire_filter_mode="truncate", fire_trust_ratio=True)
    assert fire_options(truncate) == FireOptions(filter_mode="truncate", trust_ratio=True)
    with pytest.raises(ValueError, match="fire_filter_mode 'verified' needs fire-opd's trainer"):
        FireDistillationLossConfig(loss_mode="fire_opd", fire_filter_mode="verified")


def _micro_batch(vocab: int, topk: int, seed: int = 0):
    """A verl micro-batch: nested prompts / responses / teacher top-k, model outputs in the
    no-padding layout (one row per token of prompt + response, shifted by one)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lens, response_lens = [3, 5, 2, 4, 3, 6], [6, 2, 5, 6, 4, 3]
    rows = len(prompt_lens)
    prompts = [torch.randint(3, vocab, (n,), generator=gen) for n in prompt_lens]
    responses = [torch.randint(3, vocab, (n,), generator=gen) for n in response_lens]
    teacher_logits = [torch.randn(p + r, vocab, generator=gen) * 2 for p, r in zip(prompt_lens, response_lens)]
    teacher_log_p = [torch.log_softmax(z, -1) for z in teacher_logits]
    top = [lp.topk(topk, dim=-1) for lp in teacher_log_p]
    student_logits = [torch.randn(p + r, vocab, generator=gen) for p, r in zip(prompt_lens, response_lens)]
    log_p_old = [torch.log_softmax(z, -1) for z in student_logits]
    # the current policy: a small step away from the sampler (ratios stay inside verl's dual clip)
    log_p_new = [torch.log_softmax(z + 0.05 * torch.randn(z.shape, generator=gen), -1) for z in student_logits]

    def per_token(log_p, tokens, prompt_len):  # value at position j predicts token j + 1
        seq = torch.cat([tokens[0], tokens[1]])
        out = torch.zeros(len(seq))
        out[:-1] = log_p[:-1].gather(-1, seq[1:, None]).squeeze(-1)
        return out

    entropy = [-(lp.exp() * lp).sum(-1) for lp in log_p_new]
    new_flat = torch.cat([per_token(lp, (p, r), len(p)) for lp, p, r in zip(log_p_new, prompts, responses)])
    old = [
        per_token(lp, (p, r), len(p))[len(p) - 1 : len(p) - 1 + len(r)]
        for lp, p, r in zip(log_p_old, prompts, responses)
    ]
    nested = lambda ts: torch.nested.nested_tensor(ts, layout=torch.jagged)  # noqa: E731
    log_prob = new_flat.clone().requires_grad_(True)
    data = TensorDict(
        {
            "prompts": nested(prompts),
            "responses": nested(responses),
            "response_mask": nested([torch.ones(n, dtype=torch.bool) for n in response_lens]),
            "old_log_probs": nested(old),
            "teacher_logprobs": nested([t.values for t in top]),
            "teacher_ids": nested([t.indices for t in top]),
        },
        batch_size=[rows],
    )
    for key, value in (("dp_size", 1), ("batch_num_tokens", sum(response_lens)), ("global_batch_size", rows)):
        data.set_non_tensor(key, value)  # global batch info, as verl's trainer attaches it
    model_output = {"log_probs": log_prob, "entropy": torch.cat(entropy)}

    def response_part(flat_or_list, width=None):  # [B, T] padded, the response positions only
        width = width or max(response_lens)
        out = torch.zeros(rows, width, *flat_or_list[0].shape[1:])
        for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
            out[b, :r] = flat_or_list[b][p - 1 : p - 1 + r]
        return out

    offsets = torch.tensor([0] + [p + r for p, r in zip(prompt_lens, response_lens)]).cumsum(0)
    split = lambda flat: [flat[offsets[b] : offsets[b + 1]] for b in range(rows)]  # noqa: E731
    padded_ids = torch.zeros(rows, max(response_lens), dtype=torch.long)
    mask = torch.zeros(rows, max(response_lens), dtype=torch.bool)
    for b, r in enumerate(responses):
        padded_ids[b, : len(r)], mask[b, : len(r)] = r, True
    exact = {
        "log_prob": response_part(split(log_prob)),
        "mask": mask,
        "ids": padded_ids,
        "old_log_prob": torch.stack([torch.nn.functional.pad(o, (0, max(response_lens) - len(o))) for o in old]),
        "student_entropy": response_part(entropy),
        "teacher_log_prob": response_part(
            [per_token(lp, (p, r), len(p)) for lp, p, r in zip(teacher_log_p, prompts, responses)]
        ),
        "teacher_entropy": response_part([-(lp.exp() * lp).sum(-1) for lp in teacher_log_p]),
        "teacher_top": (response_part([t.values for t in top]), response_part([t.indices.float() for t in top]).long()),
    }
    return data, model_output, exact


def _actor_config(loss_agg_mode="token-mean"):
    """What verl's distillation loss reads of the actor config."""
    return SimpleNamespace(loss_agg_mode=loss_agg_mode, global_batch_info={}, loss_scale_factor=None)


@pytest.mark.parametrize("method", ["fire", "opd", "filter_only"])
def test_verls_loss_path_equals_fire_policy_loss(method):
    """With the teacher's whole distribution as its top-k (k = V) the statistics are exact, the
    micro-batch is the batch, and verl's own distillation_loss (policy-gradient path, vanilla
    PPO) gives fire_policy_loss's value and gradient."""
    vocab = 12
    data, model_output, exact = _micro_batch(vocab, topk=vocab)
    loss_config = FireDistillationLossConfig(
        loss_mode="fire_opd",
        topk=vocab,
        use_task_rewards=False,
        loss_max_clamp=None,
        fire_method=method,
        fire_percentile=30.0,
        fire_alpha=0.8,
        fire_beta=1.2,
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.2,
    )
    distillation = DistillationConfig(enabled=False, distillation_loss=loss_config)
    loss, metrics = distillation_loss(_actor_config(), distillation, model_output, data)
    (grad,) = torch.autograd.grad(loss, model_output["log_probs"])

    log_prob = exact["log_prob"].clone().requires_grad_(True)
    expected, expected_metrics = fire_policy_loss(
        log_prob,
        exact["old_log_prob"],
        exact["teacher_log_prob"],
        exact["student_entropy"],
        exact["teacher_entropy"],
        exact["mask"],
        fire=FireOptions(method=method, percentile=30.0, alpha=0.8, beta=1.2),
        clip_ratio=0.2,
        loss_agg_mode="token-mean",
    )
    (expected_grad,) = torch.autograd.grad(expected, log_prob)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["distillation/fire/keep_ratio"] == pytest.approx(expected_metrics["fire/keep_ratio"])
    assert metrics["distillation/fire/teacher_topk_miss_rate"] == 0.0
    # the gradient w.r.t. the flat (no-padding) log-probs, gathered back to [B, T]
    prompt_lens = data["prompts"].offsets().diff()
    response_lens = data["responses"].offsets().diff()
    start = torch.cat([torch.zeros(1, dtype=torch.long), (prompt_lens + response_lens).cumsum(0)[:-1]])
    for b in range(len(prompt_lens)):
        p, r = int(prompt_lens[b]), int(response_lens[b])
        torch.testing.assert_close(
            grad[start[b] + p - 1 : start[b] + p - 1 + r], expected_grad[b, :r], rtol=1e-5, atol=1e-7
        )


def test_teacher_statistics_from_topk_are_bounded():
    """Entropy: estimate <= truth <= estimate + r log((V-k)/r) + r log q. Sampled log-prob: exact in
    the top-k, an upper bound outside. At k = V both are exact."""
    gen = torch.Generator().manual_seed(3)
    vocab = 50
    log_p = torch.log_softmax(torch.randn(400, vocab, generator=gen) * 3, -1)
    truth_entropy = -(log_p.exp() * log_p).sum(-1)
    sampled = torch.randint(0, vocab, (400,), generator=gen)
    truth_sampled = log_p.gather(-1, sampled[:, None]).squeeze(-1)
    for k in (1, 5, 20, vocab):
        top = log_p.topk(k, dim=-1)
        est_sampled, est_entropy, tail = teacher_stats_from_topk(top.values, top.indices, sampled)
        log_q = torch.minimum(top.values.min(-1).values, torch.log(tail.clamp_min(1e-30)))
        gap = tail * (torch.log(max(vocab - k, 1) / tail.clamp_min(1e-30)) + log_q)  # 0 at k = V (up to rounding)
        upper = est_entropy + torch.where(tail > 0, gap, torch.zeros_like(tail)) if k < vocab else est_entropy
        assert (est_entropy <= truth_entropy + 1e-5).all() and (truth_entropy <= upper + 1e-5).all()
        inside = (top.indices == sampled[:, None]).any(-1)
        torch.testing.assert_close(est_sampled[inside], truth_sampled[inside])
        assert (est_sampled[~inside] >= truth_sampled[~inside] - 1e-6).all()
        if k == vocab:
            torch.testing.assert_close(est_entropy, truth_entropy, rtol=1e-5, atol=1e-5)
            assert inside.all()


def test_denominator_correction_error_is_bounded():
    """Split a batch into micro-batches: verl's aggregate of the corrected advantages differs from
    FiRe's whole-batch token mean by at most max_mb |r / r_mb - 1| (r: keep ratios), and is exact
    with one micro-batch."""
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(64, 10, generator=gen) < 0.8
    kept = mask & (torch.rand(64, 1, generator=gen) < 0.7)
    values = torch.rand(64, 10, generator=gen)  # |advantages|
    exact = float((values * kept).sum() / kept.sum())
    for size in (64, 16, 8):
        total, bound, n_all, r = 0.0, 0.0, int(mask.sum()), float(kept.sum() / mask.sum())
        for rows in torch.arange(64).split(size):
            m, k = mask[rows], kept[rows]
            scale = denominator_correction(m, k, "token-mean")
            total += float((values[rows] * k).sum()) * scale / n_all  # verl: sum / all response tokens
            if k.any():
                bound = max(bound, abs(r / float(k.sum() / m.sum()) - 1))
        assert abs(total - exact) <= bound * exact + 1e-6
        if size == 64:
            assert total == pytest.approx(exact, rel=1e-6)


def test_micro_batch_filter_keeps_the_configured_share():
    """The substitute for the batch-wide filter: each micro-batch of m rollouts drops its own
    lowest p% (the quantile of the micro-batch), so its keep ratio is within 1/m of 1 - p/100."""
    gen = torch.Generator().manual_seed(7)
    mask = torch.ones(64, 6, dtype=torch.bool)
    stats = [torch.randn(64, 6, generator=gen) - 2 for _ in range(2)] + [torch.rand(64, 6, generator=gen)] * 2
    for m in (8, 16, 32):
        for rows in torch.arange(64).split(m):
            fire = compute_fire_advantages(
                stats[0][rows],
                stats[1][rows],
                stats[2][rows],
                stats[3][rows],
                mask[rows],
                fire=FireOptions(percentile=25.0),
                process_group="local",
            )
            assert abs(float(fire.kept_rollouts.float().mean()) - 0.75) <= 1.0 / m + 1e-6


def test_errors_name_the_verl_setting():
    vocab = 12
    data, model_output, _ = _micro_batch(vocab, topk=4)
    loss_config = FireDistillationLossConfig(
        loss_mode="fire_opd", topk=4, use_policy_gradient=False, loss_max_clamp=None
    )
    with pytest.raises(ValueError, match="use_policy_gradient=true"):
        distillation_loss(
            _actor_config(), DistillationConfig(enabled=False, distillation_loss=loss_config), model_output, data
        )
    loss_config = FireDistillationLossConfig(loss_mode="fire_opd", topk=4, loss_max_clamp=None)
    with pytest.raises(ValueError, match="calculate_entropy=true"):
        distillation_loss(
            _actor_config(),
            DistillationConfig(enabled=False, distillation_loss=loss_config),
            {"log_probs": model_output["log_probs"]},
            data,
        )


def test_fire_linear_cross_entropy_matches_verls_contract():
    """Same (log-probs, entropy) as verl's torch functions on materialized logits, same gradients;
    the swap points verl's module at it."""
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(37, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 37, (2, 7), generator=gen)
    log_probs, entropy = fire_linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    logits = hidden @ weight.T / 0.7
    ref_log_probs = logprobs_from_logits(logits, labels, inplace_backward=False)
    ref_entropy = entropy_from_logits(logits)
    torch.testing.assert_close(log_probs, ref_log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(2, 7, generator=gen), torch.randn(2, 7, generator=gen)
    ours = torch.autograd.grad((log_probs * upstream[0] + entropy * upstream[1]).sum(), (hidden, weight))
    theirs = torch.autograd.grad((ref_log_probs * upstream[0] + ref_entropy * upstream[1]).sum(), (hidden, weight))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(NotImplementedError, match="reduction='none'"):
        fire_linear_cross_entropy(hidden, weight, labels, 1.0, "mean")

    import verl.utils.kernel.linear_cross_entropy as verl_lce

    original = verl_lce.linear_cross_entropy
    try:
        assert "verl.utils.kernel.linear_cross_entropy" in use_fire_linear_cross_entropy()
        assert verl_lce.linear_cross_entropy is fire_linear_cross_entropy
    finally:
        verl_lce.linear_cross_entropy = original


def _tensor_parallel_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 5, 8, generator=gen)
    weight = torch.randn(12, 8, generator=gen)
    labels = torch.randint(0, 12, (2, 5), generator=gen)
    labels[0, 0], labels[1, 4] = 0, 11  # one label in each rank's shard
    upstream = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    full = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    ref = fire_linear_cross_entropy(full[0], full[1], labels, 0.9, "none")
    ref_grads = torch.autograd.grad((ref[0] * upstream[0] + ref[1] * upstream[1]).sum(), full)

    rows = slice(rank * 6, (rank + 1) * 6)  # verl's layout: rank r holds rows [r V / K, (r + 1) V / K)
    mine = [hidden.clone().requires_grad_(True), weight[rows].clone().requires_grad_(True)]
    out = fire_linear_cross_entropy(mine[0], mine[1], labels, 0.9, "none", dist.group.WORLD)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # whole-vocabulary outputs
    grads = torch.autograd.grad((out[0] * upstream[0] + out[1] * upstream[1]).sum(), mine)
    torch.testing.assert_close(grads[1], ref_grads[1][rows], rtol=1e-5, atol=1e-5)
    partial = grads[0].clone()
    dist.all_reduce(partial)  # what Megatron's reduce does with each rank's part
    torch.testing.assert_close(partial, ref_grads[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(grads[0], ref_grads[0])  # the shard's part, as verl's kernel returns it


def test_fire_linear_cross_entropy_takes_verls_tensor_parallel_group():
    """Megatron TP: each rank passes its vocabulary shard of the output weight and verl's TP group;
    outputs are the whole vocabulary's, dW is the shard's, and the ranks' dL/dh parts sum to the
    unsharded gradient (verl's kernel leaves that sum to Megatron)."""
    run_in_gloo_group(_tensor_parallel_worker, 2)
