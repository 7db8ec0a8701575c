"""Steps 1-3 of the algorithm: the rollout filter, the token weights and the advantages, over a rollout batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from fire_kernels.fire_weights import confidence_and_confusion, fire_row_stats, inverse_max
from fire_opd.algorithm.options import FireOptions
from fire_opd.parallel.distributed import active, all_gather_rows, all_reduce


@dataclass
class FireSelection:
    """What the filter and reweight steps select from a rollout batch (all detached)."""

    advantages: torch.Tensor  # [B, T] w_t * A_t on loss tokens, 0 elsewhere
    loss_mask: torch.Tensor  # [B, T] bool: tokens that enter the loss
    kept_rollouts: torch.Tensor  # [B] bool: rollouts the filter keeps
    token_weights: torch.Tensor  # [B, T] normalized weights (1 for opd / filter_only), 0 off the mask
    threshold: float  # tau_q (rollout filter) or the token-score threshold (hard_token)
    metrics: dict = field(default_factory=dict)

    def rows(self, index: torch.Tensor) -> FireSelection:
        """The selection of some rows (a micro-batch's); the batch's metrics stay behind."""
        return replace(
            self,
            advantages=self.advantages[index],
            loss_mask=self.loss_mask[index],
            kept_rollouts=self.kept_rollouts[index],
            token_weights=self.token_weights[index],
            metrics={},
        )

    def without_tokens(self) -> FireSelection:
        """The same rows with no token in the loss (a padding micro-batch's)."""
        return replace(
            self,
            loss_mask=torch.zeros_like(self.loss_mask),
            advantages=torch.zeros_like(self.advantages),
            token_weights=torch.zeros_like(self.token_weights),
        )


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
            raise ValueError(
                f"{name} must have the shape of response_mask {tuple(response_mask.shape)}, got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != response_mask.device:
            raise ValueError(f"{name} is on {t.device} but response_mask is on {response_mask.device}")
    if response_mask.dtype != torch.bool:
        if not bool(((response_mask == 0) | (response_mask == 1)).all()):
            raise ValueError("response_mask must be boolean or hold only 0 and 1")
        response_mask = response_mask.bool()
    return response_mask


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
    fire: FireOptions = FireOptions(),
    group_ids: Optional[torch.Tensor] = None,
    teacher_reliable: Optional[torch.Tensor] = None,
    backend: str = "auto",
    process_group: Optional[ProcessGroup | str] = None,
) -> FireSelection:
    """Filter and reweight a rollout batch; returns detached advantages and the loss mask.

    Args:
        old_log_prob: [B, T] log pi_old(y_t) (the sampler).
        teacher_log_prob: [B, T] log pi_T(y_t) from the teacher each rollout is routed to.
        teacher_entropy: [B, T] that teacher's full-vocab entropy.
        student_entropy: [B, T] full-vocab entropy of the student.
        response_mask: [B, T] bool (or 0/1), True on response tokens.
        fire: the method and its options (`FireOptions`).
        group_ids: [B] integer prompt id of each rollout, required for fire.filter_scope="group"; a
            group's rollouts must sit on one rank.
        teacher_reliable: [B] bool, required for fire.filter_mode="verified": whether the teacher,
            continuing from the rollout's prefix up to its first divergence token, reached a
            correct answer (`fire_opd.train.verify`); read for the rollouts the filter flags.
        backend: where the weights are computed ("auto": Triton kernel on CUDA, else torch).
        process_group: maxima, means and quantiles span this data-parallel group when
            torch.distributed is initialized (default group when None; `LOCAL`: this process only).
    """
    mask = _check_per_token(
        {
            "old_log_prob": old_log_prob,
            "teacher_log_prob": teacher_log_prob,
            "student_entropy": student_entropy,
            "teacher_entropy": teacher_entropy,
        },
        response_mask,
    )
    if not isinstance(fire, FireOptions):
        raise TypeError(f"fire must be a FireOptions, got {type(fire).__name__}")
    method, percentile, filter_scope = fire.method, fire.percentile, fire.filter_scope
    if filter_scope == "group" and (not isinstance(group_ids, torch.Tensor) or group_ids.shape != mask.shape[:1]):
        raise ValueError(
            f"filter_scope='group' needs group_ids, a [{mask.shape[0]}] tensor of prompt ids, got "
            f"{getattr(group_ids, 'shape', group_ids)}"
        )
    if (
        fire.filters
        and fire.filter_mode == "verified"
        and (not isinstance(teacher_reliable, torch.Tensor) or teacher_reliable.shape != mask.shape[:1])
    ):
        raise ValueError(
            f"filter_mode='verified' needs teacher_reliable, a [{mask.shape[0]}] bool tensor (the trainer's "
            f"verification of the flagged rollouts), got {getattr(teacher_reliable, 'shape', teacher_reliable)}"
        )
    with torch.no_grad():
        old_log_prob, teacher_log_prob = old_log_prob.detach().float(), teacher_log_prob.detach().float()
        student_entropy, teacher_entropy = student_entropy.detach().float(), teacher_entropy.detach().float()
        zero = torch.zeros((), device=mask.device)
        neg_inf = torch.tensor(float("-inf"), device=mask.device)
        # both entropy maxima in one collective; -inf when no rank has a valid token
        entropies = (teacher_entropy, student_entropy)
        maxima = torch.stack([torch.where(mask, e, neg_inf).amax() if mask.numel() else neg_inf for e in entropies])
        max_teacher_entropy, max_student_entropy = all_reduce(maxima, dist.ReduceOp.MAX, process_group).tolist()
        rows = fire_row_stats(
            teacher_log_prob=teacher_log_prob,
            student_entropy=student_entropy,
            teacher_entropy=teacher_entropy,
            mask=mask.float(),
            alpha=fire.alpha,
            beta=fire.beta,
            max_teacher_entropy=max_teacher_entropy,
            max_student_entropy=max_student_entropy,
            backend=backend,
        )
        totals = all_reduce(
            torch.stack([rows.row_weight_sum.sum(), rows.row_tokens.sum()])
            if mask.numel()
            else torch.zeros(2, device=mask.device),
            dist.ReduceOp.SUM,
            process_group,
        )
        global_tokens = float(totals[1])
        weight_mean = float(totals[0]) / global_tokens if global_tokens > 0 else 1.0
        has_tokens = rows.row_tokens > 0
        score = _trajectory_score(fire.filter_score, rows.sequence_score, teacher_log_prob, old_log_prob, mask)

        # 1. rollout filter
        kept_rollouts = has_tokens.clone()
        threshold = float("-inf")
        group_thresholds: list[float] = []  # filter_scope "group": one per prompt; fire/threshold is their mean
        if fire.filters and filter_scope == "group":
            for group in torch.unique(group_ids):
                members = (group_ids == group).to(mask.device) & has_tokens
                if bool(members.any()):
                    tau = _quantile(score[members], percentile / 100.0)
                    kept_rollouts &= ~members | (score >= tau)
                    group_thresholds.append(tau)
            threshold = sum(group_thresholds) / len(group_thresholds) if group_thresholds else float("-inf")
        elif fire.filters:
            threshold = _quantile(all_gather_rows(score[has_tokens], process_group), percentile / 100.0)
            kept_rollouts &= score >= threshold
        loss_mask = mask & kept_rollouts[:, None]
        flagged = has_tokens & ~kept_rollouts  # what the filter would drop
        truncated = torch.zeros_like(flagged)
        if fire.truncates:
            # flagged rollouts keep their prefix up to and including the first divergence token;
            # under "verified", those the teacher still finishes correctly stay whole
            truncated = flagged & divergence_tokens(teacher_log_prob, mask, fire.divergence_prob).any(dim=-1)
            if fire.filter_mode == "verified":
                assert teacher_reliable is not None  # checked above
                truncated &= ~teacher_reliable.to(mask.device).bool()
            prefix = prefix_through_divergence(teacher_log_prob, mask, fire.divergence_prob)
            loss_mask |= mask & ((flagged & ~truncated)[:, None] | (truncated[:, None] & prefix))
        confidence, confusion = confidence_and_confusion(
            student_entropy=student_entropy,
            teacher_entropy=teacher_entropy,
            inv_max_student_entropy=inverse_max(max_student_entropy),
            inv_max_teacher_entropy=inverse_max(max_teacher_entropy),
        )
        if fire.teacher_confidence_gate > 0:
            loss_mask &= confidence >= fire.teacher_confidence_gate

        # 2. token weights
        if fire.reweights:
            weights = rows.weights / weight_mean
        elif method == "hard_token":
            score = rows.weights
            threshold = _quantile(all_gather_rows(score[mask], process_group), percentile / 100.0)
            loss_mask &= score >= threshold
            weights = torch.ones_like(score)
        else:
            weights = torch.ones_like(rows.weights)
        # 3. advantages: the per-token negative sampled reverse KL, weighted
        advantage = teacher_log_prob - old_log_prob
        if fire.trust_ratio:  # min(pi_T / pi_old, 1): the teacher's trust in the sampled token
            weights = weights * advantage.clamp(max=0.0).exp()
        weights = torch.where(loss_mask, weights, zero)
        advantages = torch.where(loss_mask, weights * advantage, zero)

        # every ratio and mean below is a (numerator, denominator) pair summed over the processes in
        # one all-reduce, and the weights' range one more: two collectives for the step's metrics
        # (-min, max) of the kept weights as two maxima, -inf when no rank keeps a token (no host sync)
        signed = (-weights, weights)
        weight_range = all_reduce(
            torch.stack([torch.where(loss_mask, w, neg_inf).amax() if mask.numel() else neg_inf for w in signed]),
            dist.ReduceOp.MAX,
            process_group,
        )
        # each process ranks its own prompts: their thresholds' mean over every process travels as a pair
        # too (one process keeps its float64 mean)
        groups_spread = fire.filters and filter_scope == "group" and active(process_group)
        fractions = {
            "fire/keep_ratio": (kept_rollouts.sum(), has_tokens.sum()),
            **({"fire/truncated_ratio": (truncated.sum(), has_tokens.sum())} if fire.truncates else {}),
            "fire/token_keep_ratio": (loss_mask.sum(), mask.sum()),
            "fire/weight_mean": _masked_sum(weights, loss_mask),
            "fire/teacher_confidence_mean": _masked_sum(confidence, mask),
            "fire/student_confusion_mean": _masked_sum(confusion, mask),
            "fire/reverse_kl": _masked_sum(-advantage, mask),
            "fire/advantage_mean": _masked_sum(advantages, loss_mask),
            "fire/teacher_entropy_mean": _masked_sum(teacher_entropy, mask),
            "fire/student_entropy_mean": _masked_sum(student_entropy, mask),
        }
        if groups_spread:  # the last pair
            sums = torch.tensor([sum(group_thresholds), len(group_thresholds)], device=mask.device)
            fractions["fire/threshold"] = (sums[0], sums[1])
        pairs = all_reduce(
            torch.stack([torch.stack([num.float(), den.float()]) for num, den in fractions.values()]),
            dist.ReduceOp.SUM,
            process_group,
        )
        # one copy to the host for all of them (each float() of a GPU tensor waits for the device)
        k = len(fractions)
        host = torch.cat([pairs[:, 0] / pairs[:, 1], pairs[:, 1], weight_range.to(pairs.dtype)]).tolist()
        ratios, denominators, (minus_lowest, highest) = host[:k], host[k : 2 * k], host[2 * k :]
        metrics = {name: r if d > 0 else 0.0 for name, r, d in zip(fractions, ratios, denominators)}
        if groups_spread:  # set below, left out when no process ranked a group
            spread_mean = metrics.pop("fire/threshold")
            threshold = spread_mean if denominators[k - 1] > 0 else float("-inf")
        has_weights = math.isfinite(minus_lowest)
        metrics.update(
            {
                # no threshold (no filter, or nothing to rank): left out, as -inf is no JSON number
                **({"fire/threshold": threshold} if math.isfinite(threshold) else {}),
                "fire/weight_min": -minus_lowest if has_weights else 0.0,
                "fire/weight_max": highest if has_weights else 0.0,
                "fire/response_tokens": global_tokens,
            }
        )
    return FireSelection(advantages, loss_mask, kept_rollouts, weights, threshold, metrics)


def divergence_tokens(teacher_log_prob: torch.Tensor, mask: torch.Tensor, divergence_prob: float) -> torch.Tensor:
    """[B, T] bool: response tokens the teacher gives less than `divergence_prob` (where the
    student's sample left the teacher's distribution)."""
    return mask & (teacher_log_prob < math.log(divergence_prob))


def prefix_through_divergence(
    teacher_log_prob: torch.Tensor, mask: torch.Tensor, divergence_prob: float
) -> torch.Tensor:
    """[B, T] bool: each row's response tokens up to and including its first divergence token
    (every response token of a row without one)."""
    diverged = divergence_tokens(teacher_log_prob, mask, divergence_prob).int()
    before = diverged.cumsum(dim=-1) - diverged  # divergence tokens strictly before t
    return mask & (before == 0)


def first_divergence(teacher_log_prob: torch.Tensor, mask: torch.Tensor, divergence_prob: float) -> torch.Tensor:
    """[B] long: the position of each row's first divergence token, -1 where there is none."""
    diverged = divergence_tokens(teacher_log_prob, mask, divergence_prob)
    return torch.where(diverged.any(dim=-1), diverged.int().argmax(dim=-1), -1)


def _trajectory_score(
    kind: str,
    teacher_mean: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """[B] score of each rollout that the filter ranks (see `filter_score`); `teacher_mean` is
    the kernel's own row statistic."""
    if kind == "teacher_mean":
        return teacher_mean
    if kind == "teacher_sum":
        return torch.where(mask, teacher_log_prob, 0.0).sum(dim=-1)
    tokens = mask.sum(dim=-1).clamp_min(1)
    return torch.where(mask, teacher_log_prob - old_log_prob, 0.0).sum(dim=-1) / tokens


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of x over the mask, number of masked tokens): a masked mean before the all-reduce."""
    return torch.where(mask, x, 0.0).sum(), mask.sum()


# ----------------------------------------------------------------------------- step 4
