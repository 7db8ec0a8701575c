"""FiRe-OPD: filter rollouts, reweight tokens, then a PPO-clipped reverse-KL policy gradient.

All per-token tensors are `[batch, response_len]` (one row per rollout). The algorithm
(DESIGN.md, "The algorithm"):

1. s_i = mean_t log pi_T(y_t) over the response; keep rollout i iff s_i >= quantile(s, p/100).
2. c_t = clamp(1 - H^T_t / max H^T, 0, 1), u_t = clamp(H^S_t / max H^S, 0, 1),
   w_t = (1 + alpha c_t)(1 + beta u_t) / mean_valid(w); maxima and mean over every valid
   response token of the batch, including those of rollouts the filter drops.
3. A_t = log pi_T(y_t) - log pi_old(y_t);  A^_t = w_t A_t keep_i  (detached).
4. loss = agg( max(-A^ r, -A^ clip(r, 1 - eps, 1 + eps)) ),  r = exp(log pi_theta - log pi_old),
   over the tokens of kept rollouts.

`compute_fire_advantages` does 1-3 once per rollout batch (across data-parallel ranks when
torch.distributed is initialized); `clipped_surrogate` does 4 and can run per micro-batch
with a batch-global normalizer, so gradient accumulation reproduces the whole-batch loss.
`fire_policy_loss` chains both for callers that hold the whole batch.

Objectives. The above is `objective="sampled"` (the paper's and verl's signal: the sampled
token stands for the per-token reverse KL). `objective="full_vocab"` trains on the exact
per-token divergence D_t(pi_theta || pi_T) instead, with the same filter and weights:

    loss = sum_t k_t * w_t * keep_i * D_t        (k_t: the loss_agg_mode coefficient)

`dense_coefficients` gives k_t w_t keep_i; `fire_dense_loss` is the whole loss for one batch.
E_{y ~ pi_theta}[sampled gradient] = gradient of the full-vocab reverse KL when the ratio is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from fire_kernels.fire_weights import confidence_and_confusion, fire_row_stats, inverse_max

METHODS = ("opd", "fire", "filter_only", "reweight_only", "hard_token")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
OBJECTIVES = ("sampled", "full_vocab")
FILTER_SCOPES = ("batch", "group")
FILTER_SCORES = ("teacher_mean", "teacher_sum", "advantage_mean")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
FILTER_METHODS = ("fire", "filter_only")
_FILTERS = set(FILTER_METHODS)
_REWEIGHTS = {"fire", "reweight_only"}


@dataclass
class FireAdvantages:
    """Batch-level result of the filter and reweight steps (all detached)."""

    advantages: torch.Tensor  # [B, T] w_t * A_t on loss tokens, 0 elsewhere
    loss_mask: torch.Tensor  # [B, T] bool: tokens that enter the loss
    keep: torch.Tensor  # [B] bool: rollouts kept by the filter
    token_weights: torch.Tensor  # [B, T] normalized weights (1 for opd / filter_only), 0 off the mask
    threshold: float  # tau_q (rollout filter) or the token-score threshold (hard_token)
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- validation


def _check_per_token(names_and_tensors: dict, response_mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [batch, response_len], got shape {tuple(response_mask.shape)}")
    for name, t in names_and_tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != response_mask.shape:
            raise ValueError(f"{name} must have the shape of response_mask {tuple(response_mask.shape)}, "
                             f"got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != response_mask.device:
            raise ValueError(f"{name} is on {t.device} but response_mask is on {response_mask.device}")
    if response_mask.dtype != torch.bool:
        if not bool(((response_mask == 0) | (response_mask == 1)).all()):
            raise ValueError("response_mask must be boolean or hold only 0 and 1")
        response_mask = response_mask.bool()
    return response_mask


def _check_options(method: str, percentile: float, alpha: float, beta: float) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    if alpha < 0 or beta < 0 or not math.isfinite(alpha) or not math.isfinite(beta):
        raise ValueError(f"alpha and beta must be finite and >= 0, got alpha={alpha!r}, beta={beta!r}")


# ----------------------------------------------------------------------------- distributed helpers


# process_group=LOCAL: statistics over this process's rows only, with no collective (for callers
# whose processes do not call the loss the same number of times, e.g. verl's dynamic micro-batches)
LOCAL = "local"


def _distributed(group) -> bool:
    if group == LOCAL:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if _distributed(group):
        x = x.clone()
        _count_comm(x)
        dist.all_reduce(x, op=op, group=group)
    return x


def _count_comm(*tensors: torch.Tensor) -> None:
    from .distributed import count

    count(*tensors)


def _all_gather_varlen(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from every rank."""
    if not _distributed(group):
        return x
    from .distributed import all_gather_rows

    return all_gather_rows(x, group)


def _quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile (numpy's default, as the released code uses)."""
    if values.numel() == 0:
        return float("-inf")
    return float(torch.quantile(values.double(), q))


# ----------------------------------------------------------------------------- steps 1-3


def compute_fire_advantages(
    old_log_prob: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    method: str = "fire",
    percentile: float = 20.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    backend: str = "auto",
    process_group=None,
    filter_scope: str = "batch",
    group_ids: Optional[torch.Tensor] = None,
    filter_score: str = "teacher_mean",
    teacher_confidence_gate: float = 0.0,
) -> FireAdvantages:
    """Filter and reweight a rollout batch; returns detached advantages and the loss mask.

    Args:
        old_log_prob: [B, T] log pi_old(y_t) (the sampler).
        teacher_log_prob, teacher_entropy: [B, T] from the teacher each rollout is routed to.
        student_entropy: [B, T] full-vocab entropy of the student.
        response_mask: [B, T] bool (or 0/1), True on response tokens.
        method: "fire", "opd" (w = 1, no filter), "filter_only", "reweight_only", or
            "hard_token" (keep the tokens whose score (1 + alpha c)(1 + beta u) is at or above
            its `percentile`-th percentile over valid tokens, weight 1, no rollout filter).
        percentile: p of the filter threshold quantile(s, p / 100); 0 keeps everything.
        backend: where the weights are computed ("auto": Triton kernel on CUDA, else torch).
        process_group: maxima, means and quantiles span this data-parallel group when
            torch.distributed is initialized (default group when None; `LOCAL`: this process only).
        filter_scope: "batch" (the paper: one quantile over the whole rollout batch) or "group"
            (beyond the paper: the quantile of each prompt's own rollouts, so that the rollouts of
            hard prompts are not dropped wholesale). Weights stay batch-normalized either way.
        group_ids: [B] integer prompt id of each rollout, required for filter_scope="group"; a
            group's rollouts must sit on one rank.
        filter_score: the trajectory score the filter ranks (beyond the paper except the default):
            "teacher_mean"   s_i = mean_t log pi_T(y_t)                  (the paper)
            "teacher_sum"    s_i = sum_t log pi_T(y_t)                   (no length normalization)
            "advantage_mean" s_i = mean_t (log pi_T(y_t) - log pi_old(y_t)), minus the sampled
                             reverse KL per token: a token that is unlikely under the student too
                             does not count against its rollout.
        teacher_confidence_gate: g in [0, 1] (beyond the paper; 0 disables): tokens whose teacher
            confidence c_t = 1 - H^T_t / max H^T is below g leave the loss (teacher-reliability
            gating), for every method. Weights keep their normalization over all valid tokens.
    """
    mask = _check_per_token({"old_log_prob": old_log_prob, "teacher_log_prob": teacher_log_prob,
                             "student_entropy": student_entropy, "teacher_entropy": teacher_entropy},
                            response_mask)
    _check_options(method, percentile, alpha, beta)
    if filter_score not in FILTER_SCORES:
        raise ValueError(f"filter_score must be one of {FILTER_SCORES}, got {filter_score!r}")
    if not 0.0 <= float(teacher_confidence_gate) <= 1.0:
        raise ValueError(f"teacher_confidence_gate must be in [0, 1], got {teacher_confidence_gate!r}")
    if filter_scope not in FILTER_SCOPES:
        raise ValueError(f"filter_scope must be one of {FILTER_SCOPES}, got {filter_scope!r}")
    if filter_scope == "group" and (not isinstance(group_ids, torch.Tensor) or group_ids.shape != mask.shape[:1]):
        raise ValueError(f"filter_scope='group' needs group_ids, a [{mask.shape[0]}] tensor of prompt ids, got "
                         f"{getattr(group_ids, 'shape', group_ids)}")
    with torch.no_grad():
        old_log_prob, teacher_log_prob = old_log_prob.detach().float(), teacher_log_prob.detach().float()
        student_entropy, teacher_entropy = student_entropy.detach().float(), teacher_entropy.detach().float()
        zero = torch.zeros((), device=mask.device)
        neg_inf = torch.tensor(float("-inf"), device=mask.device)
        max_t = _all_reduce(torch.where(mask, teacher_entropy, neg_inf).amax() if mask.numel() else neg_inf,
                            dist.ReduceOp.MAX, process_group)
        max_s = _all_reduce(torch.where(mask, student_entropy, neg_inf).amax() if mask.numel() else neg_inf,
                            dist.ReduceOp.MAX, process_group)
        max_t, max_s = float(max_t), float(max_s)  # -inf when no rank has a valid token
        rows = fire_row_stats(teacher_log_prob, teacher_entropy, student_entropy, mask.float(), alpha=alpha,
                              beta=beta, max_teacher_entropy=max_t, max_student_entropy=max_s, backend=backend)
        totals = _all_reduce(torch.stack([rows.row_weight_sum.sum(), rows.row_tokens.sum()]) if mask.numel()
                             else torch.zeros(2, device=mask.device), dist.ReduceOp.SUM, process_group)
        global_tokens = float(totals[1])
        weight_mean = float(totals[0]) / global_tokens if global_tokens > 0 else 1.0
        has_tokens = rows.row_tokens > 0
        score = _trajectory_score(filter_score, rows.sequence_score, teacher_log_prob, old_log_prob, mask)

        # 1. rollout filter
        keep = has_tokens.clone()
        threshold = float("-inf")
        if method in _FILTERS and filter_scope == "group":
            group_thresholds = []  # one per prompt; fire/threshold reports their mean
            for group in torch.unique(group_ids):
                members = (group_ids == group).to(mask.device) & has_tokens
                if bool(members.any()):
                    tau = _quantile(score[members], percentile / 100.0)
                    keep &= ~members | (score >= tau)
                    group_thresholds.append(tau)
            threshold = sum(group_thresholds) / len(group_thresholds) if group_thresholds else float("-inf")
        elif method in _FILTERS:
            threshold = _quantile(_all_gather_varlen(score[has_tokens], process_group), percentile / 100.0)
            keep &= score >= threshold
        loss_mask = mask & keep[:, None]
        confidence, confusion = confidence_and_confusion(teacher_entropy, student_entropy, inverse_max(max_t),
                                                         inverse_max(max_s))
        if teacher_confidence_gate > 0:
            loss_mask &= confidence >= teacher_confidence_gate

        # 2. token weights
        if method in _REWEIGHTS:
            weights = rows.weights / weight_mean
        elif method == "hard_token":
            score = rows.weights
            threshold = _quantile(_all_gather_varlen(score[mask], process_group), percentile / 100.0)
            loss_mask &= score >= threshold
            weights = torch.ones_like(score)
        else:
            weights = torch.ones_like(rows.weights)
        weights = torch.where(loss_mask, weights, zero)

        # 3. advantages: the per-token negative sampled reverse KL, weighted
        advantage = teacher_log_prob - old_log_prob
        advantages = torch.where(loss_mask, weights * advantage, zero)

        metrics = {
            "fire/keep_ratio": _ratio(keep.sum(), has_tokens.sum(), process_group),
            "fire/token_keep_ratio": _ratio(loss_mask.sum(), mask.sum(), process_group),
            "fire/threshold": threshold,
            **_masked_stats("fire/weight", weights, loss_mask, process_group),
            "fire/teacher_confidence_mean": _masked_mean(confidence, mask, process_group),
            "fire/student_confusion_mean": _masked_mean(confusion, mask, process_group),
            "fire/reverse_kl": _masked_mean(-advantage, mask, process_group),
            "fire/advantage_mean": _masked_mean(advantages, loss_mask, process_group),
            "fire/teacher_entropy_mean": _masked_mean(teacher_entropy, mask, process_group),
            "fire/student_entropy_mean": _masked_mean(student_entropy, mask, process_group),
            "fire/response_tokens": global_tokens,
        }
    return FireAdvantages(advantages, loss_mask, keep, weights, threshold, metrics)


def _trajectory_score(kind: str, teacher_mean: torch.Tensor, teacher_log_prob: torch.Tensor,
                      old_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] score of each rollout that the filter ranks (see `filter_score`); `teacher_mean` is
    the kernel's own row statistic."""
    if kind == "teacher_mean":
        return teacher_mean
    if kind == "teacher_sum":
        return torch.where(mask, teacher_log_prob, 0.0).sum(dim=-1)
    tokens = mask.sum(dim=-1).clamp_min(1)
    return torch.where(mask, teacher_log_prob - old_log_prob, 0.0).sum(dim=-1) / tokens


def _ratio(num: torch.Tensor, den: torch.Tensor, group) -> float:
    both = _all_reduce(torch.stack([num.float(), den.float()]), dist.ReduceOp.SUM, group)
    return float(both[0] / both[1]) if float(both[1]) > 0 else 0.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, group) -> float:
    both = _all_reduce(torch.stack([torch.where(mask, x, 0.0).sum(), mask.sum().float()]), dist.ReduceOp.SUM, group)
    return float(both[0] / both[1]) if float(both[1]) > 0 else 0.0


def _masked_stats(prefix: str, x: torch.Tensor, mask: torch.Tensor, group) -> dict:
    any_token = bool(mask.any())
    lo = _all_reduce(x[mask].min() if any_token else torch.tensor(float("inf"), device=x.device),
                     dist.ReduceOp.MIN, group)
    hi = _all_reduce(x[mask].max() if any_token else torch.tensor(float("-inf"), device=x.device),
                     dist.ReduceOp.MAX, group)
    has = math.isfinite(float(lo))
    return {f"{prefix}_mean": _masked_mean(x, mask, group), f"{prefix}_min": float(lo) if has else 0.0,
            f"{prefix}_max": float(hi) if has else 0.0}


# ----------------------------------------------------------------------------- step 4


def loss_normalizer(loss_mask: torch.Tensor, loss_agg_mode: str, process_group=None) -> float:
    """Denominator of the aggregated loss over a whole batch: kept tokens for token-mean,
    kept sequences (with at least one loss token) for the seq-mean modes. Pass it to
    `clipped_surrogate` for every micro-batch so that accumulated gradients equal the
    whole-batch gradient."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    count = loss_mask.sum() if loss_agg_mode == "token-mean" else loss_mask.any(dim=-1).sum()
    return float(_all_reduce(count.float(), dist.ReduceOp.SUM, process_group))


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
        old_log_prob, advantages: [B, T], detached.
        loss_mask: [B, T] bool, tokens that enter the loss.
        normalizer: denominator from `loss_normalizer` over the whole batch; None uses this
            call's own tokens / sequences. An empty mask gives a finite zero loss.
    Returns:
        (scalar loss, {"fire/clip_frac", "fire/ratio_mean", "fire/pg_loss"}).
    """
    mask = _check_per_token({"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages},
                            loss_mask)
    if not clip_ratio > 0:
        raise ValueError(f"clip_ratio must be > 0, got {clip_ratio!r}")
    advantages = advantages.detach()
    # Mask before exp: garbage log-probs on padding must not become inf * 0 = nan in backward.
    log_ratio = torch.where(mask, log_prob - old_log_prob.detach(), torch.zeros_like(log_prob))
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    per_token = torch.maximum(-advantages * ratio, -advantages * clipped)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    loss = (per_token * token_loss_scale(mask, loss_agg_mode, normalizer)).sum()
    with torch.no_grad():
        clip_hit = (-advantages * clipped > -advantages * ratio) & mask
        n = max(int(mask.sum()), 1)
        metrics = {"fire/clip_frac": float(clip_hit.sum()) / n,
                   "fire/ratio_mean": float(torch.where(mask, ratio, 0.0).sum()) / n,
                   "fire/pg_loss": float(loss)}
    return loss, metrics


def fire_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    method: str = "fire",
    percentile: float = 20.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    clip_ratio: float = 0.2,
    loss_agg_mode: str = "token-mean",
    backend: str = "auto",
    filter_score: str = "teacher_mean",
    teacher_confidence_gate: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The FiRe-OPD loss for one rollout batch, all inputs `[batch, response_len]`.

    Gradient flows only through `log_prob`. Returns (loss, metrics) with stable keys
    (`fire/keep_ratio`, `fire/threshold`, `fire/weight_mean|min|max`,
    `fire/teacher_confidence_mean`, `fire/student_confusion_mean`, `fire/reverse_kl`,
    `fire/clip_frac`, ...).
    """
    fire = compute_fire_advantages(old_log_prob, teacher_log_prob, student_entropy, teacher_entropy, response_mask,
                                   method=method, percentile=percentile, alpha=alpha, beta=beta, backend=backend,
                                   filter_score=filter_score, teacher_confidence_gate=teacher_confidence_gate)
    loss, surrogate_metrics = clipped_surrogate(log_prob, old_log_prob, fire.advantages, fire.loss_mask,
                                                clip_ratio=clip_ratio, loss_agg_mode=loss_agg_mode)
    return loss, {**fire.metrics, **surrogate_metrics}


# ----------------------------------------------------------------------------- the dense objective


def dense_coefficients(fire: FireAdvantages, loss_agg_mode: str = "token-mean",
                       normalizer: Optional[float] = None) -> torch.Tensor:
    """Per-token coefficients [B, T] of the dense objective, loss = sum_t coef_t * D_t:
    the aggregation coefficient k_t (see `token_loss_scale`) times the FiRe weight w_t, zero off
    the loss mask (dropped rollouts, hard_token's unselected tokens, padding). Detached."""
    return token_loss_scale(fire.loss_mask, loss_agg_mode, normalizer) * fire.token_weights


def fire_dense_loss(
    divergence: torch.Tensor,
    old_log_prob: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    method: str = "fire",
    percentile: float = 20.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    loss_agg_mode: str = "token-mean",
    backend: str = "auto",
    filter_score: str = "teacher_mean",
    teacher_confidence_gate: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """FiRe-OPD with the dense objective for one rollout batch, all inputs `[batch, response_len]`.

    `divergence` is the per-token full-vocab D_t(pi_theta || pi_T) (from
    `fire_kernels.teacher_student_stats(..., divergence=...)`), the only input with gradient.
    The filter and weights are those of `fire_policy_loss` (they use `old_log_prob` only for the
    `fire/reverse_kl` metric). Returns (loss, metrics).
    """
    _check_per_token({"divergence": divergence}, response_mask)
    fire = compute_fire_advantages(old_log_prob, teacher_log_prob, student_entropy, teacher_entropy, response_mask,
                                   method=method, percentile=percentile, alpha=alpha, beta=beta, backend=backend,
                                   filter_score=filter_score, teacher_confidence_gate=teacher_confidence_gate)
    coefficients = dense_coefficients(fire, loss_agg_mode)
    loss = (torch.where(fire.loss_mask, divergence, torch.zeros_like(divergence)) * coefficients).sum()
    return loss, {**fire.metrics, **dense_metrics(divergence, fire.loss_mask, loss)}


def dense_metrics(divergence: torch.Tensor, loss_mask: torch.Tensor, loss: torch.Tensor) -> dict:
    n = max(int(loss_mask.sum()), 1)
    return {"fire/divergence": float(torch.where(loss_mask, divergence.detach(), 0.0).sum()) / n,
            "fire/dense_loss": float(loss.detach())}
