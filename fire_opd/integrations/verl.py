"""FiRe-OPD as a verl 0.9.1 distillation loss, and fire-opd's kernels under verl's actor.

Installed as a verl plugin (`pip install fire-opd[verl]` registers the `verl.plugins` entry
point `fire_opd`, which verl imports at `import verl`). Select it with

    distillation.enabled=true
    distillation.distillation_loss.loss_mode=fire_opd
    distillation.distillation_loss.use_policy_gradient=true     # (false in verl's distillation.yaml)
    distillation.distillation_loss.use_task_rewards=false       # pure distillation
    distillation.distillation_loss.topk=64                      # teacher top-k (see below)
    distillation.distillation_loss.loss_max_clamp=null          # FiRe advantages may exceed 10
    actor_rollout_ref.actor.calculate_entropy=true              # the student entropy FiRe needs
    # FiRe's own fields (defaults: method fire, percentile 20, alpha 1, beta 1):
    distillation.distillation_loss._target_=fire_opd.integrations.verl.FireDistillationLossConfig
    +distillation.distillation_loss.fire_percentile=20

verl calls the loss per micro-batch with the student's log-probs and entropy and the teacher's
top-k log-probs from its teacher server; the loss returns, per token, minus the FiRe advantage
w_t (log pi_T(y_t) - log pi_old(y_t)) (zero on dropped rollouts), which verl's policy-gradient
path turns into its PPO clipped surrogate (`advantages = -loss`), as the paper does on verl.

What verl does not give, and the substitutes (each bounded by a test in
tests/test_integration_verl.py):

  * Teacher entropy. verl returns the teacher's top-k log-probs, not its distribution. H_T is
    estimated by the lower bound  -sum_topk p log p - r log min(p_k, r)  (r: the mass outside
    the top-k, every tail token has p <= min(p_k, r)); the truth lies below
    -sum_topk p log p + r log((V - k) / r). Exact when r = 0 (k = V).
  * The teacher log-prob of a sampled token outside the teacher's top-k (verl drops it). It
    is replaced by its upper bound log min(p_k, r); exact for tokens inside the top-k.
  * A batch-wide filter. verl's loss sees one micro-batch at a time, and processes may call it
    a different number of times (dynamic batch sizes), so the filter quantile, the confidence
    normalizer max H_T and the weights' means are those of the micro-batch (what the authors'
    released verl code does). Use large `ppo_micro_batch_size_per_gpu` for a filter close to
    the batch-wide one; fire-opd's trainer and the TRL integration filter over the whole batch.
  * The token-mean denominator. verl divides by every response token of the global batch,
    dropped ones included. The advantages are scaled by (response tokens / kept tokens) of the
    micro-batch (sequences for the seq-mean modes), which is exact when every micro-batch keeps
    the same fraction r and otherwise off by at most max over micro-batches |r / r_mb - 1|
    (relative, for advantages of one sign).
  * The dense (full-vocabulary) objective needs the teacher's whole distribution, which verl's
    teacher server does not return: under verl the sampled objective is trained.

`use_fire_linear_cross_entropy()` swaps verl's fused `linear_cross_entropy` (log-probs and
entropy from hidden states and the lm_head weight) for fire-opd's `token_stats`, for users who
want our kernels under verl's actor (`actor_rollout_ref.model.use_fused_kernels=true`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from verl.trainer.distillation.losses import DistillationLossSettings, register_distillation_loss
from verl.workers.config import DistillationLossConfig
from verl.workers.utils.padding import no_padding_2_padding

from fire_kernels import token_stats
from fire_opd.algorithm.options import FireOptions, with_fire_fields
from fire_opd.algorithm.selection import compute_fire_advantages
from fire_opd.parallel import distributed

LOSS_NAME = "fire_opd"


@dataclass
@with_fire_fields("fire_", literals=False)  # every FireOptions field as fire_<name>; OmegaConf has no Literal
class FireDistillationLossConfig(DistillationLossConfig):
    """verl's DistillationLossConfig plus FiRe-OPD's fields, `fire_` + each `FireOptions` field
    (select it with
    `distillation.distillation_loss._target_=fire_opd.integrations.verl.FireDistillationLossConfig`)."""

    def __post_init__(self):
        super().__post_init__()
        fire = fire_options(self)  # validated once, fields named as written (fire_percentile, ...)
        if fire.filter_mode == "verified":  # the loss cannot run the teacher's generation
            raise ValueError(
                "fire_filter_mode 'verified' needs fire-opd's trainer (its teachers finish the flagged rollouts); "
                "use drop or truncate in verl"
            )
        if fire.filter_scope != "batch":  # the loss sees micro-batches, not prompt groups
            raise ValueError(f"fire_filter_scope must be batch in verl; got {fire.filter_scope!r}")


def fire_options(loss_config) -> FireOptions:
    """The FiRe options of a loss config; verl's plain DistillationLossConfig gives the defaults."""
    names = [f"fire_{f.name}" for f in dataclasses.fields(FireOptions)]
    return FireOptions.from_fields({n: getattr(loss_config, n) for n in names if hasattr(loss_config, n)}, "fire_")


# ----------------------------------------------------------------------------- teacher statistics from top-k


def teacher_stats_from_topk(
    topk_log_probs: torch.Tensor, topk_ids: torch.Tensor, sampled_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi_T(y_t) or its upper bound, entropy lower bound, entropy upper-bound gap term).

    topk_log_probs, topk_ids: [B, T, k] the teacher's k most likely tokens (sorted or not);
    sampled_ids: [B, T]. With tail mass r = 1 - sum_topk p and p_min the smallest top-k prob,
    every tail token has p <= q = min(p_min, r), so
        H_T >= -sum_topk p log p - r log q          (returned estimate)
        log pi_T(y) <= log q  for y outside the top-k (returned for those tokens).
    The third output is r, from which callers bound the estimate's error
    (r log((V - k) / r) + r log q)."""
    log_p = topk_log_probs.float()
    p = log_p.exp()
    head_entropy = -(p * log_p).sum(-1)
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    log_q = torch.minimum(log_p.min(-1).values, torch.log(tail.clamp_min(1e-30)))
    entropy = head_entropy - torch.where(tail > 0, tail * log_q, torch.zeros_like(tail))
    hit = topk_ids == sampled_ids.unsqueeze(-1)
    in_topk = hit.any(-1)
    sampled = torch.where(in_topk, (log_p * hit).sum(-1), log_q)
    return sampled, entropy, tail


def _padded(tensor: torch.Tensor, data) -> torch.Tensor:
    return tensor.to_padded_tensor(0) if getattr(tensor, "is_nested", False) else tensor


# ----------------------------------------------------------------------------- the loss verl calls


@register_distillation_loss(DistillationLossSettings(names=[LOSS_NAME], use_topk=True))
def fire_opd_distillation_loss(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict]:
    """verl DistillationLossFn: per-token -(FiRe advantage) [B, T] and metrics (module docstring)."""
    loss_config = distillation_config.distillation_loss
    if not loss_config.use_policy_gradient:
        raise ValueError(
            "loss_mode=fire_opd returns per-token advantages for verl's policy-gradient path: set "
            "distillation.distillation_loss.use_policy_gradient=true"
        )
    if model_output.get("entropy") is None:
        raise ValueError(
            "loss_mode=fire_opd needs the student's entropy: set actor_rollout_ref.actor.calculate_entropy=true"
        )
    mask = _padded(data["response_mask"], data).bool()
    old_log_prob = _padded(data["old_log_probs"], data).float()
    student_entropy = no_padding_2_padding(model_output["entropy"], data).float()
    topk_log_probs = no_padding_2_padding(data["teacher_logprobs"], data)
    topk_ids = no_padding_2_padding(data["teacher_ids"], data)
    responses = _padded(data["responses"], data)
    teacher_log_prob, teacher_entropy, tail = teacher_stats_from_topk(topk_log_probs, topk_ids, responses)

    fire = compute_fire_advantages(
        old_log_prob,
        teacher_log_prob,
        student_entropy,
        teacher_entropy,
        mask,
        fire=fire_options(loss_config),
        process_group=distributed.LOCAL,
    )
    advantages = fire.advantages * denominator_correction(mask, fire.loss_mask, config.loss_agg_mode)
    metrics: dict[str, Any] = {f"distillation/{key}": value for key, value in fire.metrics.items()}
    outside = mask & ~(topk_ids == responses.unsqueeze(-1)).any(-1)
    metrics["distillation/fire/teacher_topk_miss_rate"] = float(outside.sum()) / max(int(mask.sum()), 1)
    metrics["distillation/fire/teacher_tail_mass"] = float(tail[mask].mean()) if mask.any() else 0.0
    return -advantages, metrics


def denominator_correction(response_mask: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str) -> float:
    """verl aggregates over every response token (sequence); FiRe over the kept ones: the ratio
    of the two counts in this micro-batch (1 when nothing is dropped or nothing is kept)."""
    if loss_agg_mode in ("token-mean", "token-sum"):
        total, kept = response_mask.sum(), loss_mask.sum()
    else:
        total, kept = response_mask.any(-1).sum(), loss_mask.any(-1).sum()
    if loss_agg_mode == "token-sum" or int(kept) == 0:
        return 1.0
    return float(total) / float(kept)


# ----------------------------------------------------------------------------- verl's fused kernel, swapped


def fire_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: Optional[float] = 1.0,
    reduction: Optional[str] = "none",
    dist_process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's `linear_cross_entropy` contract: (log-probs, entropy) of `labels` under
    softmax(hidden @ weight.T / temperature), both shaped like `labels`, differentiable w.r.t.
    hidden and weight; computed by `fire_kernels.token_stats` (no [tokens, vocab] logits).

    With `dist_process_group` (verl's Megatron actor passes the tensor-parallel group) `weight` is
    this rank's contiguous shard of the vocabulary, `labels` are global ids and the outputs are
    the whole vocabulary's, as in verl's kernel; the hidden-state gradient is this shard's part,
    as verl's kernel returns it (Megatron's sequence-parallel gather reduces it)."""
    if reduction != "none":
        raise NotImplementedError(
            f"fire_linear_cross_entropy supports reduction='none' (what verl's actor uses), got {reduction!r}"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    log_probs, entropy = token_stats(
        flat_hidden,
        weight.to(flat_hidden.dtype),
        labels.reshape(-1),
        temperature=float(temperature if temperature is not None else 1.0),
        vocab_process_group=dist_process_group,
        reduce_hidden_grad=False,
    )
    return log_probs.view(labels.shape), entropy.view(labels.shape)


_PATCHED_MODULES = (
    "verl.utils.kernel.linear_cross_entropy",
    "verl.models.mcore.model_forward_fused",
    "verl.models.mcore.model_forward_1f1b_overlap",
)


def use_fire_linear_cross_entropy() -> list[str]:
    """Point verl's `linear_cross_entropy` at `fire_linear_cross_entropy` in every module that
    holds it (the FSDP model forwards import it at call time from the first one). Returns the
    modules patched; call once per process (e.g. from a plugin) before the actor runs."""
    import importlib
    import sys

    patched = []
    for name in _PATCHED_MODULES:
        module = sys.modules.get(name)
        if module is None and name == _PATCHED_MODULES[0]:
            module = importlib.import_module(name)
        if module is not None and hasattr(module, "linear_cross_entropy"):
            setattr(module, "linear_cross_entropy", fire_linear_cross_entropy)  # noqa: B010 (a module's function)
            patched.append(name)
    return patched


__all__ = [
    "FireDistillationLossConfig",
    "LOSS_NAME",
    "denominator_correction",
    "fire_linear_cross_entropy",
    "fire_opd_distillation_loss",
    "teacher_stats_from_topk",
    "use_fire_linear_cross_entropy",
]
