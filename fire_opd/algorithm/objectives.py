"""Step 4 and the dense objective: the clipped surrogate, the per-token divergence loss and their normalizers."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from fire_opd.algorithm.options import LOSS_AGG_MODES, FireOptions
from fire_opd.algorithm.selection import FireSelection, _check_per_token, compute_fire_advantages
from fire_opd.parallel.distributed import all_reduce


def loss_normalizer(
    loss_mask: torch.Tensor, loss_agg_mode: str, process_group: Optional[ProcessGroup | str] = None
) -> float:
    """Denominator of the aggregated loss over a whole batch: kept tokens for token-mean,
    kept sequences (with at least one loss token) for the seq-mean modes. Pass it to
    `clipped_surrogate` for every micro-batch so that accumulated gradients equal the
    whole-batch gradient."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    count = loss_mask.sum() if loss_agg_mode == "token-mean" else loss_mask.any(dim=-1).sum()
    return float(all_reduce(count.float(), dist.ReduceOp.SUM, process_group))


def token_loss_scale(loss_mask: torch.Tensor, loss_agg_mode: str, normalizer: Optional[float] = None) -> torch.Tensor:
    """Per-token coefficients c [B, T] with aggregated loss = sum_t c_t * l_t:

        token-mean            c = m / N_tokens
        seq-mean-token-mean   c = m / (len_i * N_seqs)
        seq-mean-token-sum    c = m / N_seqs

    N_tokens / N_seqs (sequences with at least one loss token) are this batch's own unless
    `normalizer` (from `loss_normalizer` over the whole batch) is given."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    mask = loss_mask.float()
    if normalizer is None:
        normalizer = float(mask.sum() if loss_agg_mode == "token-mean" else loss_mask.any(dim=-1).sum())
    scale = mask / max(float(normalizer), 1.0)
    if loss_agg_mode == "seq-mean-token-mean":
        scale = scale / mask.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return scale


def ppo_clip(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's per-token objective max(-A r, -A clip(r, 1 - eps, 1 + eps)) and its two branches
    (-A r, -A clip(r)): the loss is the larger, and its gradient in r is -A where the first one
    is taken, 0 where the clipped one is. Shapes: any, all alike."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    return torch.maximum(unclipped, clipped), unclipped, clipped


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    loss_agg_mode: str = "token-mean",
    normalizer: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(log_prob - old_log_prob).

    Args:
        log_prob: [B, T] log pi_theta(y_t), the only input that carries gradient.
        old_log_prob: [B, T] log pi_old(y_t), detached.
        advantages: [B, T], detached.
        loss_mask: [B, T] bool, tokens that enter the loss.
        normalizer: denominator from `loss_normalizer` over the whole batch; None uses this
            call's own tokens / sequences. An empty mask gives a finite zero loss.
    Returns:
        (scalar loss, {"fire/clip_frac", "fire/ratio_mean", "fire/pg_loss"}).
    """
    mask = _check_per_token({"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages}, loss_mask)
    if not clip_ratio > 0:
        raise ValueError(f"clip_ratio must be > 0, got {clip_ratio!r}")
    advantages = advantages.detach()
    # Mask before exp: garbage log-probs on padding must not become inf * 0 = nan in backward.
    log_ratio = torch.where(mask, log_prob - old_log_prob.detach(), torch.zeros_like(log_prob))
    ratio = torch.exp(log_ratio)
    per_token, unclipped, clipped = ppo_clip(ratio, advantages, clip_ratio)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    loss = (per_token * token_loss_scale(mask, loss_agg_mode, normalizer)).sum()
    with torch.no_grad():
        clip_hit = (clipped > unclipped) & mask
        n = max(int(mask.sum()), 1)
        metrics = {
            "fire/clip_frac": float(clip_hit.sum()) / n,
            "fire/ratio_mean": float(torch.where(mask, ratio, 0.0).sum()) / n,
            "fire/pg_loss": float(loss),
        }
    return loss, metrics


def fire_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    fire: FireOptions = FireOptions(),
    group_ids: Optional[torch.Tensor] = None,
    teacher_reliable: Optional[torch.Tensor] = None,
    clip_ratio: float = 0.2,
    loss_agg_mode: str = "token-mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """The FiRe-OPD loss for one rollout batch, all inputs `[batch, response_len]`.

    Gradient flows only through `log_prob`; `teacher_reliable` as in `compute_fire_advantages`
    (fire.filter_mode "verified"). Returns (loss, metrics) with stable keys
    (`fire/keep_ratio`, `fire/threshold`, `fire/weight_mean|min|max`,
    `fire/teacher_confidence_mean`, `fire/student_confusion_mean`, `fire/reverse_kl`,
    `fire/clip_frac`, ...).
    """
    selection = compute_fire_advantages(
        old_log_prob,
        teacher_log_prob,
        student_entropy,
        teacher_entropy,
        response_mask,
        fire=fire,
        group_ids=group_ids,
        teacher_reliable=teacher_reliable,
        backend=backend,
    )
    loss, surrogate_metrics = clipped_surrogate(
        log_prob,
        old_log_prob,
        selection.advantages,
        selection.loss_mask,
        clip_ratio=clip_ratio,
        loss_agg_mode=loss_agg_mode,
    )
    return loss, {**selection.metrics, **surrogate_metrics}


# ----------------------------------------------------------------------------- the dense objective


def dense_coefficients(
    selection: FireSelection, loss_agg_mode: str = "token-mean", normalizer: Optional[float] = None
) -> torch.Tensor:
    """Per-token coefficients [B, T] of the dense objective, loss = sum_t coef_t * D_t:
    the aggregation coefficient k_t (see `token_loss_scale`) times the FiRe weight w_t, zero off
    the loss mask (dropped rollouts, hard_token's unselected tokens, padding). Detached."""
    return token_loss_scale(selection.loss_mask, loss_agg_mode, normalizer) * selection.token_weights


def fire_dense_loss(
    divergence: torch.Tensor,
    old_log_prob: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    fire: FireOptions = FireOptions(),
    group_ids: Optional[torch.Tensor] = None,
    teacher_reliable: Optional[torch.Tensor] = None,
    loss_agg_mode: str = "token-mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """FiRe-OPD with the dense objective for one rollout batch, all inputs `[batch, response_len]`.

    `divergence` is the per-token full-vocab D_t(pi_theta || pi_T) (from
    `fire_kernels.teacher_student_stats(..., divergence=...)`), the only input with gradient.
    The filter and weights are those of `fire_policy_loss` (they use `old_log_prob` only for the
    `fire/reverse_kl` metric). Returns (loss, metrics).
    """
    _check_per_token({"divergence": divergence}, response_mask)
    selection = compute_fire_advantages(
        old_log_prob,
        teacher_log_prob,
        student_entropy,
        teacher_entropy,
        response_mask,
        fire=fire,
        group_ids=group_ids,
        teacher_reliable=teacher_reliable,
        backend=backend,
    )
    coefficients = dense_coefficients(selection, loss_agg_mode)
    loss = (torch.where(selection.loss_mask, divergence, torch.zeros_like(divergence)) * coefficients).sum()
    return loss, {**selection.metrics, **dense_metrics(divergence, selection.loss_mask, loss)}


def dense_metrics(divergence: torch.Tensor, loss_mask: torch.Tensor, loss: torch.Tensor) -> dict:
    n = max(int(loss_mask.sum()), 1)
    return {
        "fire/divergence": float(torch.where(loss_mask, divergence.detach(), 0.0).sum()) / n,
        "fire/dense_loss": float(loss.detach()),
    }
