"""The oracle: materialize [N, V] logits and let PyTorch autograd differentiate.

Memory is O(N * V); use it for tests and as the baseline in benchmarks, never in training.
The divergences follow the definitions used by TRL's `generalized_jsd_loss` and Liger's
`LigerFusedLinearJSDLoss` (beta = 0: KL(teacher || student), beta = 1: KL(student || teacher),
otherwise beta * KL(q || M) + (1 - beta) * KL(p || M) with M = (1 - beta) p + beta q).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fire_kernels._validation import DIV_FORWARD_KL, DIV_JSD, DIV_REVERSE_KL, PLAIN_HEAD, HeadSpec, StatsProblem


def _accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def materialized_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    inv_temperature: float,
    head: HeadSpec = PLAIN_HEAD,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[N, V] logits in float32 (float64 for float64 inputs), the head's order of operations:
    softcap * tanh(((h W^T + b) * scale) / softcap) / tau."""
    acc = _accumulate_dtype(hidden)
    logits = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        logits = logits + bias.to(acc)
    logits = logits * head.scale
    if head.softcap:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return logits * inv_temperature


def materialized_log_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    inv_temperature: float,
    head: HeadSpec = PLAIN_HEAD,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log_softmax of `materialized_logits`: [N, V]."""
    return torch.log_softmax(materialized_logits(hidden, weight, inv_temperature, head, bias), dim=-1)


def divergence_from_log_probs(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, divergence: int, jsd_beta: float
) -> torch.Tensor:
    """Per-row divergence between student p and teacher q given [N, V] log-probs."""
    if divergence == DIV_REVERSE_KL:  # KL(p || q)
        return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True).sum(-1)
    if divergence == DIV_FORWARD_KL:  # KL(q || p)
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    if divergence == DIV_JSD:
        log_mixture = torch.logsumexp(
            torch.stack([student_log_probs + math.log(1.0 - jsd_beta), teacher_log_probs + math.log(jsd_beta)], dim=0),
            dim=0,
        )
        teacher_kl = F.kl_div(log_mixture, teacher_log_probs, reduction="none", log_target=True).sum(-1)
        student_kl = F.kl_div(log_mixture, student_log_probs, reduction="none", log_target=True).sum(-1)
        return jsd_beta * teacher_kl + (1.0 - jsd_beta) * student_kl
    raise ValueError(f"unknown divergence kind {divergence}")


def reference_stats(
    problem: StatsProblem,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
):
    """Returns (student_log_prob, student_entropy, teacher_log_prob, teacher_entropy, divergence), [N] each;
    teacher entries and divergence are None when not asked. Differentiable through autograd."""
    valid = targets != problem.ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    log_p = materialized_log_softmax(
        student_hidden, student_weight, problem.inv_temperature, problem.student_head, student_bias
    )
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)

    def per_row(log_probs: torch.Tensor):
        log_prob = log_probs.gather(1, safe_targets[:, None]).squeeze(1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return torch.where(valid, log_prob, zero), torch.where(valid, entropy, zero)

    student_log_prob, student_entropy = per_row(log_p)
    if not problem.has_teacher:
        return student_log_prob, student_entropy, None, None, None
    assert teacher_hidden is not None and teacher_weight is not None  # has_teacher
    with torch.no_grad():
        log_q = materialized_log_softmax(
            teacher_hidden, teacher_weight, problem.inv_temperature, problem.teacher_head, teacher_bias
        )
        teacher_log_prob, teacher_entropy = per_row(log_q)
    divergence = None
    if problem.divergence:
        divergence = torch.where(
            valid, divergence_from_log_probs(log_p, log_q, problem.divergence, problem.jsd_beta), zero
        )
    return student_log_prob, student_entropy, teacher_log_prob, teacher_entropy, divergence
