"""Per-row streaming-softmax statistics: the O(N) state both fused backends carry over the vocab.

Both the chunked (PyTorch) and the Triton backend sweep the vocabulary in tiles and keep,
for every token row and for each model, with logits z (student) / u (teacher):

    m  = running max of z
    S  = sum_v exp(z_v - m)
    A  = sum_v exp(z_v - m) * (z_v - m)        (shifted first moment: no cancellation at |z| ~ 1e4)
    zy = z_y                                    (the sampled token's logit)
    K  = sum_v exp(z_v - m) * (z_v - u_v)      (reverse KL cross term, student-weighted)
      or sum_v exp(u_v - m_u) * (u_v - z_v)    (forward KL cross term, teacher-weighted)

When the max moves from m to m' every sum is rescaled by exp(m - m'); A also picks up the
shift:  A' = exp(m - m') * (A + (m - m') * S).  From the final state

    lse = m + log S,   log p(y) = zy - lse,   H = log S - A / S,
    KL(p || q) = K / S_p - lse_z + lse_u,      KL(q || p) = K / S_q - lse_u + lse_z
    (evaluated as (K / S_p - (m_z - m_u)) - (log S_p - log S_q) to cancel exactly when p == q).

The Triton backend splits the vocabulary across programs and writes one state per split;
`merge_splits` combines them with the same rescaling rule, and `vocab_parallel.VocabShards`
combines the states of vocabulary shards held by different ranks with it too.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fire_kernels._validation import DIV_FORWARD_KL, DIV_JSD, DIV_NONE, DIV_REVERSE_KL, StatsProblem
from fire_kernels.vocab_parallel import merged

# Row layout of the Triton forward workspace `partials[split, field, row]`.
F_M_S, F_S_S, F_A_S, F_ZY, F_M_T, F_S_T, F_A_T, F_UY, F_CROSS = range(9)
NUM_FIELDS = 9


class StreamState(NamedTuple):
    """The per-row state of a sweep over (a shard or split of) the vocabulary, [N] each (module
    docstring): the student's m, S, A and target logit; the teacher's, when there is one; the
    divergence's cross term K, when asked for."""

    m_s: torch.Tensor
    s_s: torch.Tensor
    a_s: torch.Tensor
    zy: torch.Tensor
    m_t: Optional[torch.Tensor] = None
    s_t: Optional[torch.Tensor] = None
    a_t: Optional[torch.Tensor] = None
    uy: Optional[torch.Tensor] = None
    cross: Optional[torch.Tensor] = None


class BackwardInputs(NamedTuple):
    """What every backend's backward reads: the forward's inputs, its per-row results and the
    upstream gradients of the three differentiable outputs ([N] each, zero on ignored rows; the
    divergence's None when it carries none). Made once by the caller (the autograd Function or a
    fused update), so the backends share one setup."""

    student_hidden: torch.Tensor  # [N, D_s]
    student_weight: torch.Tensor  # [V, D_s]
    targets: torch.Tensor  # [N]
    teacher_hidden: Optional[torch.Tensor]  # [N, D_t]
    teacher_weight: Optional[torch.Tensor]  # [V, D_t]
    student_lse: torch.Tensor
    student_entropy: torch.Tensor
    teacher_lse: Optional[torch.Tensor]
    div_aux: Optional[torch.Tensor]  # the JSD's second-sweep term, when there is one
    grad_log_prob: torch.Tensor
    grad_entropy: torch.Tensor
    grad_divergence: Optional[torch.Tensor]
    student_bias: Optional[torch.Tensor] = None  # [V]
    teacher_bias: Optional[torch.Tensor] = None  # [V]

    def divergence_kind(self, problem: StatsProblem) -> int:
        """The divergence whose gradient the backward forms: DIV_NONE when it carries none (the
        teacher's tiles are then not recomputed)."""
        return problem.divergence if self.grad_divergence is not None else DIV_NONE

    def rows_with_gradient(self) -> torch.Tensor:
        """[N] bool: rows whose upstream gradient is not zero (the others skip the recompute)."""
        rows = (self.grad_log_prob != 0) | (self.grad_entropy != 0)
        if self.grad_divergence is not None:
            rows |= self.grad_divergence != 0
        return rows


class RowStats(NamedTuple):
    """Final per-row results of a forward sweep (all float32 or float64, shape [N])."""

    student_log_prob: torch.Tensor
    student_entropy: torch.Tensor
    student_lse: torch.Tensor
    teacher_log_prob: Optional[torch.Tensor]
    teacher_entropy: Optional[torch.Tensor]
    teacher_lse: Optional[torch.Tensor]
    divergence: Optional[torch.Tensor]


def merge_splits(m: torch.Tensor, s: torch.Tensor, a: torch.Tensor, *extra: torch.Tensor):
    """Combine per-split online-softmax states along dim 0.

    m, s, a: [splits, N]; extra: further exp(z - m)-weighted sums [splits, N] (the KL cross term).
    Returns (m, s, a, *extra) of shape [N].
    """
    if m.shape[0] == 1:
        return (m[0], s[0], a[0], *(x[0] for x in extra))
    m_all = m.amax(dim=0)
    scale = torch.exp(m - m_all)
    s_all = (scale * s).sum(dim=0)
    a_all = (scale * (a + (m - m_all) * s)).sum(dim=0)
    return (m_all, s_all, a_all, *((scale * x).sum(dim=0) for x in extra))


def finalize(valid: torch.Tensor, state: StreamState, divergence: int = 0, shards=None) -> RowStats:
    """Turn merged streaming state into log-probs, entropies and the divergence; rows where
    `valid` is False give 0 (their targets are ignore_index). `shards` (a
    `vocab_parallel.VocabShards`, or None) first merges the state of every rank's vocabulary
    shard, so the results are the whole vocabulary's."""
    if shards is not None:
        state = shards.merge_state(state, divergence)
    m_s, s_s, a_s, zy, m_t, s_t, a_t, uy, cross = state
    zero = torch.zeros((), dtype=m_s.dtype, device=m_s.device)
    lse_s = m_s + torch.log(s_s)
    lp_s = torch.where(valid, zy - lse_s, zero)
    ent_s = torch.where(valid, torch.log(s_s) - a_s / s_s, zero)
    if m_t is None:
        return RowStats(lp_s, ent_s, lse_s, None, None, None, None)
    lse_t = m_t + torch.log(s_t)
    lp_t = torch.where(valid, uy - lse_t, zero)
    ent_t = torch.where(valid, torch.log(s_t) - a_t / s_t, zero)
    div = None
    # KL = K/S - lse_z + lse_u, grouped as (K/S - (m_z - m_u)) - (log S_z - log S_u): the
    # cross term's (z - u) and the maxima's difference round alike, so identical or
    # single-token distributions give exactly 0 instead of O(eps * |z|).
    if divergence == DIV_REVERSE_KL:
        div = torch.where(valid, (cross / s_s - (m_s - m_t)) - (torch.log(s_s) - torch.log(s_t)), zero)
    elif divergence == DIV_FORWARD_KL:
        div = torch.where(valid, (cross / s_t - (m_t - m_s)) - (torch.log(s_t) - torch.log(s_s)), zero)
    elif divergence == DIV_JSD:
        div = None  # needs a second sweep with the final lse; filled in by the caller
    return RowStats(lp_s, ent_s, lse_s, lp_t, ent_t, lse_t, div)


def finish_jsd(
    stats: RowStats, valid: torch.Tensor, kl_to_mixture: torch.Tensor, beta: float, shards=None
) -> tuple[RowStats, torch.Tensor]:
    """The generalized JSD from the sums of its two KLs to the mixture over the vocabulary (this
    shard's, merged over `shards`): JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m), where
    kl_to_mixture is [2, N] (KL(q || m), KL(p || m)). Returns the stats with it as `divergence`,
    and KL(p || m), which the backward reuses. Every backend ends its JSD forward here."""
    kl_q_m, kl_p_m = merged(shards, kl_to_mixture)
    divergence = torch.where(valid, beta * kl_q_m + (1.0 - beta) * kl_p_m, torch.zeros_like(kl_p_m))
    return stats._replace(divergence=divergence), kl_p_m
