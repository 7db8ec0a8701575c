"""From hidden states and lm_head weights to the FiRe-OPD loss, with no [tokens, vocab] logits.

Every `*_head` argument is the [V, D] lm_head weight or an `LMHead` (`fire_opd.ops.heads.lm_head(model)`:
the weight with the model's bias, logit scale and soft-cap). `vocab_size`: the tokenizer's vocabulary
when the heads are padded past it (the two may have different numbers of rows); rows past it take
no part in any softmax (fire_kernels' `vocab_size`).

`response_token_stats` flattens `[batch, response_len, D]` hidden states, marks padding with
`ignore_index` and calls `fire_kernels`; `fire_policy_loss_from_hidden` is the whole loss for
one batch; `FireOPDLoss` is the update-step module the trainer calls per micro-batch.

`vocab_process_group` (the trainer's `parallel.vocab: true`, `fire_opd.parallel.sharded_head`): the
weights are this process's rows of the lm_heads, the statistics run over the response tokens of
every process (gathered), and each process keeps its own tokens' values. A loss is then that of
every process's tokens, so that each lm_head shard gets the whole batch's gradient.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import torch
from torch.distributed import ProcessGroup

from fire_kernels import TeacherStudentStats, teacher_student_stats, token_stats
from fire_kernels.fused_update import linear_divergence_update, linear_log_prob_update
from fire_opd.algorithm.objectives import (
    clipped_surrogate,
    dense_metrics,
    fire_dense_loss,
    fire_policy_loss,
    ppo_clip,
    token_loss_scale,
)
from fire_opd.algorithm.options import OBJECTIVES
from fire_opd.ops.heads import HeadLike, as_head
from fire_opd.parallel.sharded_head import gather_tokens

IGNORE_INDEX = -100


def response_token_stats(
    student_hidden: torch.Tensor,
    student_head: HeadLike,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[HeadLike] = None,
    *,
    temperature: float = 1.0,
    divergence: Optional[str] = None,
    jsd_beta: float = 0.5,
    backend: str = "auto",
    vocab_process_group: Optional[ProcessGroup] = None,
    vocab_size: Optional[int] = None,
) -> TeacherStudentStats:
    """Per-token student (and teacher) log-prob and entropy for response tokens.

    Args:
        student_hidden: [B, T, D_s] hidden states whose position t predicts response_ids[:, t].
        student_head: [V, D_s] lm_head weight.
        response_ids: [B, T] the sampled token ids.
        response_mask: [B, T] True on response tokens.
        teacher_hidden: [B, T, D_t], optional; scored in the same sweep.
        teacher_head: [V, D_t] the teacher's lm_head weight (with `teacher_hidden`).
        divergence: also return this full-vocab divergence per token ("reverse_kl" is
            KL(student || teacher); "forward_kl", "jsd" with `jsd_beta`), differentiable.
        vocab_process_group: vocabulary-sharded weights (module docstring); scoring only (no
            gradient: a loss must cover every process's tokens, as `FireOPDLoss` does).
    """
    if vocab_process_group is not None and torch.is_grad_enabled() and student_hidden.requires_grad:
        raise ValueError(
            "response_token_stats with vocab_process_group scores (no gradient); train with "
            "FireOPDLoss(fused_update=True, vocab_process_group=...)"
        )
    hidden = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden}
    tokens = _response_tokens(vocab_process_group, response_ids, response_mask, hidden)
    shape, n = response_ids.shape, response_ids.numel()
    (t_h,) = tokens.per_token
    out: tuple[Optional[torch.Tensor], ...]
    if t_h is None:
        out = token_stats(
            tokens.hidden, student_head, tokens.targets, temperature=temperature, backend=backend,
            vocab_process_group=vocab_process_group, vocab_size=vocab_size,
        ) + (None,) * 3  # fmt: skip
    else:
        if teacher_head is None:
            raise ValueError("teacher_hidden needs teacher_head")
        out = teacher_student_stats(
            tokens.hidden, student_head, t_h, teacher_head, tokens.targets, temperature=temperature,
            divergence=divergence, jsd_beta=jsd_beta, backend=backend, vocab_process_group=vocab_process_group,
            vocab_size=vocab_size,
        )  # fmt: skip
    own = [None if t is None else tokens.own(t, n).view(shape) for t in out]
    student_log_prob, student_entropy, *teacher_part = own
    assert student_log_prob is not None and student_entropy is not None
    return TeacherStudentStats(student_log_prob, student_entropy, *teacher_part)


class GatheredTokens(NamedTuple):
    """The tokens a sweep runs on: with a vocab group, every process's scored rows (targets not
    ignored), gathered; without one, this process's rows as given."""

    hidden: torch.Tensor  # [M, D]
    targets: torch.Tensor  # [M]
    per_token: list[Optional[torch.Tensor]]  # each [M] / [M, D], or None as given
    mine: slice  # this process's rows of the M
    valid_rows: Optional[torch.Tensor]  # which of this process's N rows they are (None: all, in order)

    def own(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """This process's [n] rows of per-token `values` [M] (0 on rows it did not score)."""
        if self.valid_rows is None:
            return values
        return values.new_zeros(n).index_copy(0, self.valid_rows, values[self.mine])


def _response_tokens(
    group,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    hidden: Mapping[str, Optional[torch.Tensor]],
    *per_token: Optional[torch.Tensor],
) -> GatheredTokens:
    """`GatheredTokens` of a batch's response tokens: the [B, T] ids as flat targets (IGNORE_INDEX
    off `mask`), each [B, T, D] of `hidden` (by argument name, the student's first; None passes)
    flattened to [N, D] and checked against the ids, and the [N] / [N, D] `per_token` values."""
    if response_ids.dim() != 2 or mask.shape != response_ids.shape:
        raise ValueError(
            f"response_ids and response_mask must both be [batch, response_len], got "
            f"{tuple(response_ids.shape)} and {tuple(mask.shape)}"
        )
    targets = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, IGNORE_INDEX)).reshape(-1)
    for name, h in hidden.items():
        if h is not None and (h.dim() != 3 or h.shape[:2] != response_ids.shape):
            raise ValueError(
                f"{name} must be [batch, response_len, D] matching response_ids "
                f"{tuple(response_ids.shape)}, got {tuple(h.shape)}"
            )
    flat = [None if h is None else h.reshape(-1, h.shape[-1]) for h in hidden.values()]
    student, *rest = flat + list(per_token)
    assert student is not None
    if group is None:
        return GatheredTokens(student, targets, rest, slice(0, targets.shape[0]), None)
    valid_rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    (h, y, *rest), mine = gather_tokens(
        group, student[valid_rows], targets[valid_rows], *(None if t is None else t[valid_rows] for t in rest)
    )
    assert h is not None and y is not None
    return GatheredTokens(h, y, rest, mine, valid_rows)


def fire_policy_loss_from_hidden(
    student_hidden: torch.Tensor,
    student_head: HeadLike,
    teacher_hidden: torch.Tensor,
    teacher_head: HeadLike,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    old_log_prob: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    objective: str = "sampled",
    divergence: str = "reverse_kl",
    jsd_beta: float = 0.5,
    backend: str = "auto",
    vocab_size: Optional[int] = None,
    **loss_kwargs,
) -> tuple[torch.Tensor, dict]:
    """`fire_policy_loss` (objective "sampled") or `fire_dense_loss` (objective "full_vocab",
    with `divergence` and `jsd_beta`) straight from hidden states: one fused sweep gives the
    student's log-prob and entropy, the teacher's log-prob and entropy and, for the dense
    objective, the divergence (with gradient).

    old_log_prob: [B, T] from the sampler; None means fully on-policy (old = current, detached).
    loss_kwargs: fire (FireOptions), group_ids, loss_agg_mode
        and, for "sampled", clip_ratio.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    dense = objective == "full_vocab"
    stats = response_token_stats(
        student_hidden,
        student_head,
        response_ids,
        response_mask,
        teacher_hidden,
        teacher_head,
        temperature=temperature,
        divergence=divergence if dense else None,
        jsd_beta=jsd_beta,
        backend=backend,
        vocab_size=vocab_size,
    )
    old = stats.student_log_prob.detach() if old_log_prob is None else old_log_prob
    teacher_log_prob, teacher_entropy = stats.teacher_log_prob, stats.teacher_entropy
    assert teacher_log_prob is not None and teacher_entropy is not None  # scored with the teacher
    per_token = (old, teacher_log_prob, stats.student_entropy.detach(), teacher_entropy, response_mask)
    if dense:
        assert stats.divergence is not None
        return fire_dense_loss(stats.divergence, *per_token, **loss_kwargs)
    return fire_policy_loss(stats.student_log_prob, *per_token, **loss_kwargs)


class _PrecomputedGradients(torch.autograd.Function):
    """A loss computed without autograd, made differentiable w.r.t. hidden, weight and bias with
    the gradients `fire_kernels.fused_update` formed in the same sweep (as Liger's fused linear
    losses do); backward only scales them by the upstream gradient. `bias`: None for bias-free heads."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None)


def _with_gradients(hidden: torch.Tensor, head: HeadLike, update) -> torch.Tensor:
    """`update.loss` differentiable w.r.t. `hidden` and the head's weight and bias (`update`: a
    `LogprobUpdate` or `DivergenceUpdate` of them)."""
    head = as_head(head)
    return _PrecomputedGradients.apply(
        hidden, head.weight, head.bias, update.loss, update.grad_hidden, update.grad_weight, update.grad_bias
    )


class FireOPDLoss:
    """Update-step loss from hidden states: advantages, weights and the loss mask are
    precomputed for the whole rollout batch (`compute_fire_advantages`). `sampled` is the
    sampled objective (log pi_theta through `fire_kernels`, then the clipped surrogate);
    `dense` is the full-vocab objective. Only the student's hidden states and lm_head weight
    receive gradient.

    `vocab_process_group` (fused_update only): vocabulary-sharded lm_heads; the returned loss is
    that of every process's tokens, its metrics (`fire/pg_loss`, `fire/dense_loss`, ...) this
    process's, as without a group."""

    def __init__(
        self,
        *,
        clip_ratio: float = 0.2,
        loss_agg_mode: str = "token-mean",
        temperature: float = 1.0,
        backend: str = "auto",
        fused_update: bool = True,
        divergence: str = "reverse_kl",
        jsd_beta: float = 0.5,
        vocab_process_group: Optional[ProcessGroup] = None,
        vocab_size: Optional[int] = None,
    ):
        if vocab_process_group is not None and not fused_update:
            raise ValueError("vocab_process_group needs fused_update=True")
        self.clip_ratio, self.loss_agg_mode = clip_ratio, loss_agg_mode
        self.temperature, self.backend, self.fused_update = temperature, backend, fused_update
        self.divergence, self.jsd_beta = divergence, jsd_beta
        self.vocab_process_group = vocab_process_group
        self.vocab_size = vocab_size  # padded heads: the tokenizer's vocabulary (fire_kernels' vocab_size)

    def dense(
        self,
        student_hidden: torch.Tensor,
        student_head: HeadLike,
        teacher_hidden: torch.Tensor,
        teacher_head: HeadLike,
        response_ids: torch.Tensor,
        coefficients: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict]:
        """The dense objective sum_t coefficients_t * D_t(student || teacher) from hidden states,
        with no [tokens, vocab] logits; returns (loss, metrics).

        Shapes: student_hidden [B, T, D_s], teacher_hidden [B, T, D_t], heads [V, D_*], response_ids,
        coefficients and loss_mask [B, T]. The coefficients come from `dense_coefficients` over the
        whole batch, so micro-batches accumulate to the whole-batch gradient; tokens with
        coefficient 0 (off the loss mask) are skipped and give D = 0. `fused_update` forms the
        gradients in the forward sweep (`fire_kernels.fused_update.linear_divergence_update`);
        otherwise autograd runs through `fire_kernels.teacher_student_stats`."""
        n = response_ids.numel()
        hidden = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden}
        tokens = _response_tokens(
            self.vocab_process_group, response_ids, coefficients != 0, hidden, coefficients.reshape(-1).detach()
        )
        gathered_teacher, coefficient = tokens.per_token
        assert gathered_teacher is not None and coefficient is not None
        if self.fused_update:
            with torch.no_grad():  # the sweep forms the gradients itself
                update = linear_divergence_update(
                    tokens.hidden, student_head, gathered_teacher, teacher_head, tokens.targets, coefficient,
                    divergence=self.divergence, jsd_beta=self.jsd_beta, temperature=self.temperature,
                    backend=self.backend, vocab_process_group=self.vocab_process_group, vocab_size=self.vocab_size,
                    reduce_hidden_grad=False,
                )  # fmt: skip
            loss = _with_gradients(tokens.hidden, student_head, update)
            values = tokens.own(update.divergence, n).view(response_ids.shape)
        else:
            out = teacher_student_stats(
                tokens.hidden, student_head, gathered_teacher, teacher_head, tokens.targets,
                temperature=self.temperature, divergence=self.divergence, jsd_beta=self.jsd_beta,
                backend=self.backend, vocab_size=self.vocab_size,
            )  # fmt: skip
            assert out.divergence is not None  # asked for
            loss = (out.divergence * coefficient.to(out.divergence.dtype)).sum()
            values = out.divergence.detach().view(response_ids.shape)
        own = loss if self.vocab_process_group is None else (coefficients.detach() * values).sum()
        return loss, dense_metrics(values, loss_mask.bool(), own)

    def sampled(
        self,
        student_hidden: torch.Tensor,
        student_head: HeadLike,
        response_ids: torch.Tensor,
        old_log_prob: torch.Tensor,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        normalizer: Optional[float] = None,
    ) -> tuple[torch.Tensor, dict]:
        """`clipped_surrogate(log pi_theta, ...)` from hidden states; returns (loss, metrics).
        Shapes: hidden [B, T, D]; head [V, D]; ids, old_log_prob, advantages, loss_mask [B, T].
        `fused_update` forms the gradient in the forward sweep
        (`fire_kernels.fused_update.linear_log_prob_update`: 3 matrix products on the chunked path
        instead of 4)."""
        clip_ratio, agg_mode = self.clip_ratio, self.loss_agg_mode
        if not self.fused_update:
            stats = response_token_stats(
                student_hidden, student_head, response_ids, loss_mask, temperature=self.temperature,
                backend=self.backend, vocab_size=self.vocab_size,
            )  # fmt: skip
            return clipped_surrogate(
                stats.student_log_prob, old_log_prob, advantages, loss_mask, clip_ratio=clip_ratio,
                loss_agg_mode=agg_mode, normalizer=normalizer,
            )  # fmt: skip
        n = response_ids.numel()
        tokens = _response_tokens(
            self.vocab_process_group,
            response_ids,
            loss_mask,
            {"student_hidden": student_hidden},
            old_log_prob.detach().reshape(-1).float(),
            advantages.detach().reshape(-1).float(),
            token_loss_scale(loss_mask.bool(), agg_mode, normalizer).reshape(-1).float(),
        )
        old, adv, scale = tokens.per_token
        assert old is not None and adv is not None and scale is not None

        def grad_fn(lp: torch.Tensor, rows: slice):
            # pg = max(-A r, -A clip(r)); d pg / d lp = r d pg / d r = -A r where the unclipped branch is taken
            ratio = torch.exp(torch.where(scale[rows] > 0, lp - old[rows], 0.0))
            pg, unclipped, clipped = ppo_clip(ratio, adv[rows], clip_ratio)
            return (scale[rows] * pg).sum(), torch.where(unclipped >= clipped, unclipped, 0.0) * scale[rows]

        with torch.no_grad():  # the sweep forms the gradients itself
            update = linear_log_prob_update(
                tokens.hidden, student_head, tokens.targets, grad_fn, temperature=self.temperature,
                backend=self.backend, vocab_process_group=self.vocab_process_group, vocab_size=self.vocab_size,
                reduce_hidden_grad=False,
            )  # fmt: skip
        loss = _with_gradients(tokens.hidden, student_head, update)
        log_prob = tokens.own(update.log_prob, n).view(response_ids.shape)
        own, metrics = clipped_surrogate(
            log_prob, old_log_prob, advantages, loss_mask, clip_ratio=clip_ratio, loss_agg_mode=agg_mode,
            normalizer=normalizer,
        )  # fmt: skip
        own = loss if self.vocab_process_group is None else own
        return loss, {**metrics, "fire/pg_loss": float(own.detach())}
