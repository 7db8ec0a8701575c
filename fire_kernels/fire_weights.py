"""FiRe token weights and rollout scores: one Triton program per rollout, with a PyTorch twin.

For rollout i and response token t (mask m_t), given batch-wide maxima over valid tokens:

    c_t = clamp(1 - H^T_t / max H^T, 0, 1)          teacher confidence
    u_t = clamp(H^S_t / max H^S, 0, 1)              student confusion
    w_t = (1 + alpha c_t)(1 + beta u_t) * m_t       raw weight (normalized by its mean later)
    s_i = sum_t m_t log pi_T(y_t) / sum_t m_t       rollout score for the filter

The kernel writes w [B, T], s [B] and the per-row sums of w and m, so that the caller can
normalize w by its mean over every valid token of the batch (across ranks when distributed)
and take the quantile of s, both cheap O(B) reductions done in PyTorch.
A max of 0 (every valid token has zero entropy) gives c = 1 and u = 0, the limits of the
clamp, instead of a division by zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

FIRE_WEIGHTS_BLOCK = 1024


class FireRowStats(NamedTuple):
    weights: torch.Tensor  # [B, T] raw (unnormalized) weights, 0 on masked tokens
    sequence_score: torch.Tensor  # [B] mean teacher log-prob over the response (0 if no token)
    row_weight_sum: torch.Tensor  # [B]
    row_tokens: torch.Tensor  # [B] number of valid tokens


@triton.jit
def _fire_weights_kernel(
    TEACHER_LOGPROB,
    TEACHER_ENTROPY,
    STUDENT_ENTROPY,
    MASK,
    WEIGHTS,
    SEQ_SCORE,
    ROW_WEIGHT_SUM,
    ROW_TOKENS,
    response_len,
    inv_max_teacher_entropy,
    inv_max_student_entropy,
    alpha,
    beta,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * response_len
    score = tl.zeros((BLOCK,), tl.float32)
    weight_sum = tl.zeros((BLOCK,), tl.float32)
    tokens = tl.zeros((BLOCK,), tl.float32)
    for t0 in range(0, response_len, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        in_row = offs < response_len
        m = tl.load(MASK + base + offs, mask=in_row, other=0.0)
        h_t = tl.load(TEACHER_ENTROPY + base + offs, mask=in_row, other=0.0)
        h_s = tl.load(STUDENT_ENTROPY + base + offs, mask=in_row, other=0.0)
        lp_t = tl.load(TEACHER_LOGPROB + base + offs, mask=in_row, other=0.0)
        confidence = tl.minimum(tl.maximum(1.0 - h_t * inv_max_teacher_entropy, 0.0), 1.0)
        confusion = tl.minimum(tl.maximum(h_s * inv_max_student_entropy, 0.0), 1.0)
        w = tl.where(m > 0, (1.0 + alpha * confidence) * (1.0 + beta * confusion), 0.0)
        tl.store(WEIGHTS + base + offs, w, mask=in_row)
        score += tl.where(m > 0, lp_t, 0.0)
        weight_sum += w
        tokens += tl.where(m > 0, 1.0, 0.0)
    n_tokens = tl.sum(tokens, 0)
    tl.store(SEQ_SCORE + row, tl.sum(score, 0) / tl.maximum(n_tokens, 1.0))
    tl.store(ROW_WEIGHT_SUM + row, tl.sum(weight_sum, 0))
    tl.store(ROW_TOKENS + row, n_tokens)


def inverse_max(maximum: float) -> float:
    """1 / max, or 0 when max <= 0 (every valid entropy is 0, or there is no valid token):
    then c = 1 and u = 0, the limits of the clamps, instead of a division by zero."""
    return 1.0 / maximum if maximum > 0 else 0.0


def confidence_and_confusion(
    *,
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    inv_max_student_entropy: float,
    inv_max_teacher_entropy: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """c = clamp(1 - H^T / max H^T, 0, 1) and u = clamp(H^S / max H^S, 0, 1), float32 [B, T]."""
    confidence = (1.0 - teacher_entropy.float() * inv_max_teacher_entropy).clamp(0.0, 1.0)
    confusion = (student_entropy.float() * inv_max_student_entropy).clamp(0.0, 1.0)
    return confidence, confusion


def _masked_max(x: torch.Tensor, valid: torch.Tensor) -> float:
    return float(x[valid].max()) if bool(valid.any()) else 0.0


def fire_row_stats_torch(
    *,
    teacher_log_prob: torch.Tensor,
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    mask: torch.Tensor,
    inv_max_student_entropy: float,
    inv_max_teacher_entropy: float,
    alpha: float,
    beta: float,
) -> FireRowStats:
    """PyTorch twin of `_fire_weights_kernel` (the CPU path and the kernel's test oracle)."""
    valid = mask > 0
    confidence, confusion = confidence_and_confusion(
        student_entropy=student_entropy,
        teacher_entropy=teacher_entropy,
        inv_max_student_entropy=inv_max_student_entropy,
        inv_max_teacher_entropy=inv_max_teacher_entropy,
    )
    weights = torch.where(valid, (1.0 + alpha * confidence) * (1.0 + beta * confusion), 0.0)
    tokens = valid.float().sum(-1)
    score = torch.where(valid, teacher_log_prob.float(), 0.0).sum(-1) / tokens.clamp_min(1.0)
    return FireRowStats(weights, score, weights.sum(-1), tokens)


def fire_row_stats(
    *,
    teacher_log_prob: torch.Tensor,
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    max_teacher_entropy: float | None = None,
    max_student_entropy: float | None = None,
    backend: str = "auto",
) -> FireRowStats:
    """Raw FiRe weights and rollout scores for [B, T] statistics. The statistics are keyword
    arguments, named as everywhere in fire-opd (student before teacher, log-prob before entropy):
    two entropies passed in each other's place would give wrong weights without an error.

    Args:
        teacher_log_prob, student_entropy, teacher_entropy: [B, T] per-token statistics.
        mask: [B, T] response mask (bool or 0/1 float).
        max_teacher_entropy / max_student_entropy: batch maxima over valid tokens; computed
            here when None (pass global values when the batch is sharded across ranks).
        backend: "triton" (CUDA or interpreter), "torch", or "auto" (triton on CUDA).
    """
    tensors = {
        "teacher_log_prob": teacher_log_prob,
        "teacher_entropy": teacher_entropy,
        "student_entropy": student_entropy,
        "mask": mask,
    }
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape != mask.shape:
            raise ValueError(f"{name} must be [batch, response_len] = {tuple(mask.shape)}, got {tuple(t.shape)}")
    valid = mask > 0
    inv_t = inverse_max(max_teacher_entropy if max_teacher_entropy is not None else _masked_max(teacher_entropy, valid))
    inv_s = inverse_max(max_student_entropy if max_student_entropy is not None else _masked_max(student_entropy, valid))
    if backend == "auto":
        backend = "triton" if mask.is_cuda else "torch"
    if backend == "torch":
        return fire_row_stats_torch(
            teacher_log_prob=teacher_log_prob, student_entropy=student_entropy, teacher_entropy=teacher_entropy,
            mask=mask, inv_max_student_entropy=inv_s, inv_max_teacher_entropy=inv_t, alpha=alpha, beta=beta,
        )  # fmt: skip
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    rows, length = mask.shape
    as_f32 = [t.contiguous().float() for t in (teacher_log_prob, teacher_entropy, student_entropy, mask)]
    weights = torch.empty((rows, length), dtype=torch.float32, device=mask.device)
    score, weight_sum, tokens = (torch.empty(rows, dtype=torch.float32, device=mask.device) for _ in range(3))
    if rows > 0 and length > 0:
        block = min(FIRE_WEIGHTS_BLOCK, triton.next_power_of_2(length))
        _fire_weights_kernel[(rows,)](
            *as_f32, weights, score, weight_sum, tokens, length, inv_t, inv_s, float(alpha), float(beta), BLOCK=block
        )
    else:
        score.zero_(), weight_sum.zero_(), tokens.zero_()
    return FireRowStats(weights, score, weight_sum, tokens)
