"""Public API: `token_stats` and `teacher_student_stats`, with backend dispatch in one place.

    token_stats(hidden[N, D], head, targets[N])                    -> (log_prob[N], entropy[N])
    teacher_student_stats(student_hidden, head,
                          teacher_hidden, teacher_head, targets)   -> TeacherStudentStats

A head is the lm_head's [V, D] weight or an `LMHead` (weight, bias, logit scale, soft-cap).
Both are differentiable w.r.t. the student hidden states and lm_head through the
student log-prob, the student entropy and the divergence; teacher outputs carry no gradient.
Backends: "triton" (fused, CUDA or the CPU interpreter), "chunked" (bounded tiles: on CUDA
cuBLAS products folded by Triton kernels, `tile_fold`; elsewhere PyTorch ops), "reference"
(materialized logits, the oracle), "auto" (chunked; see `resolve_backend`).

Precision under `torch.autocast` is autocast's: where it is on for the hidden states' device, every
entry point first casts the hidden states and heads (floating tensors other than float64) to its
dtype, as autocast does to a matmul's operands and as the fused-linear peers do before their
kernels (Cut Cross-Entropy, Liger, TRL's), then computes with autocast off (`autocast_inputs`,
`autocast_off`). So a float32 model under bf16 autocast gets bf16 products, accumulated in float32
on every backend as for bf16 inputs, and its gradients come back in its own dtypes (rounded to the
autocast dtype first, as autocast's own matmul backward rounds them). Autocast must not reach
inside: the reference's `h @ W^T` and the fused updates' whole-row `mm(out=float32)` would meet
operands of two dtypes (a RuntimeError before 2ab5c12; TRL's Trainer under transformers 4.x runs the
loss inside CPU autocast). Outside autocast the inputs' dtypes are the products' dtypes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple, Optional

import torch
from torch.distributed import ProcessGroup

from fire_kernels import vocab_parallel
from fire_kernels._validation import DIV_NONE, StatsProblem, validate_stats_inputs
from fire_kernels.backends import chunked, triton_token_stats
from fire_kernels.backends._row_stats import BackwardInputs
from fire_kernels.lm_head import HeadLike, LMHead, as_head
from fire_kernels.reference import reference_stats


class TeacherStudentStats(NamedTuple):
    """Per-token statistics, float32 (float64 for float64 inputs), shape [N] each ([B, T] from
    `fire_opd.ops.loss_from_hidden.response_token_stats`). The teacher's fields are None when
    no teacher was given, `divergence` when none was asked for."""

    student_log_prob: torch.Tensor
    student_entropy: torch.Tensor
    teacher_log_prob: Optional[torch.Tensor]
    teacher_entropy: Optional[torch.Tensor]
    divergence: Optional[torch.Tensor]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend and refuse triton where it cannot run.

    The rule (csrc_notes/tile_fold.md): "auto" is "chunked" on every device. On CUDA that is
    cuBLAS on bounded tiles plus one Triton fold per tile, whose products run at cuBLAS speed
    with no tile tuning. The cost model puts the fused kernels' backward atomics,
    N V D 4 (1 / BLOCK_N + 1 / BLOCK_V) bytes, at 7-14x the fold path's tile traffic for every
    model pair we target (Qwen3, Llama 3, Gemma 2 at N = 8192), so "triton" is chosen only
    explicitly until a GPU measurement says otherwise."""
    if backend == "auto":
        return "chunked"
    if backend == "triton" and device.type != "cuda" and not triton_token_stats.interpreter_active():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); use backend='chunked' on the CPU, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter"
        )
    return backend


_FORWARD = {"chunked": chunked.chunked_forward, "triton": triton_token_stats.triton_forward}
_BACKWARD = {"chunked": chunked.chunked_backward, "triton": triton_token_stats.triton_backward}


class FusedTokenStatsFunction(torch.autograd.Function):
    """Streaming forward that saves O(N) row statistics; backward recomputes logit tiles.

    Outputs: student_log_prob, student_entropy, teacher_log_prob, teacher_entropy, divergence
    (the last three are empty tensors when there is no teacher / no divergence, so that
    autograd sees a fixed output arity).

    With `shards` (vocab_parallel.VocabShards) the weights are this rank's vocabulary shard,
    `targets` are shard-local ids and `problem` describes the shard: the forward merges the
    ranks' streaming states, and the backward completes dL/dh with one all-reduce."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        targets,
        problem,
        backend,
        shards=None,
    ):
        forward_impl = _FORWARD[backend]
        stats, div_aux = forward_impl(
            problem,
            student_hidden,
            student_weight,
            targets,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            shards=shards,
        )
        empty = stats.student_log_prob.new_empty(0)
        ctx.problem, ctx.backend, ctx.shards = problem, backend, shards
        div = bool(problem.divergence)
        ctx.save_for_backward(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden if div else None,
            teacher_weight if div else None,
            teacher_bias if div else None,
            targets,
            stats.student_lse,
            stats.student_entropy,
            stats.teacher_lse if div else None,
            div_aux,
        )
        outputs = (
            stats.student_log_prob,
            stats.student_entropy,
            stats.teacher_log_prob if problem.has_teacher else empty,
            stats.teacher_entropy if problem.has_teacher else empty,
            stats.divergence if problem.divergence else empty,
        )
        ctx.mark_non_differentiable(outputs[2], outputs[3])
        return outputs

    @staticmethod
    def backward(ctx, g_log_prob, g_entropy, _g_t_log_prob, _g_t_entropy, g_divergence):
        (
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            targets,
            student_lse,
            student_entropy,
            teacher_lse,
            div_aux,
        ) = ctx.saved_tensors
        problem: StatsProblem = ctx.problem
        acc = student_lse.dtype
        valid = targets != problem.ignore_index

        def upstream(g: Optional[torch.Tensor]) -> torch.Tensor:
            # Ignored rows get no gradient whatever the caller sends back.
            if g is None:
                return torch.zeros_like(student_lse)
            return torch.where(valid, g.to(acc), torch.zeros((), dtype=acc, device=g.device))

        grad_divergence = (
            upstream(g_divergence) if (problem.divergence != DIV_NONE and g_divergence is not None) else None
        )
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        inputs = BackwardInputs(
            student_hidden, student_weight, targets, teacher_hidden, teacher_weight, student_lse, student_entropy,
            teacher_lse, div_aux, upstream(g_log_prob), upstream(g_entropy), grad_divergence,
            student_bias=student_bias, teacher_bias=teacher_bias,
        )  # fmt: skip
        with autocast_off(student_hidden.device):  # `backward()` may run inside autocast
            grad_hidden, grad_weight, grad_bias = _BACKWARD[ctx.backend](
                problem,
                inputs,
                need_hidden_grad=need_h,
                need_weight_grad=need_w,
                need_bias_grad=need_b,
            )
        if grad_hidden is not None:  # every vocabulary shard contributes to dL/dh
            grad_hidden = vocab_parallel.complete_hidden_grad(ctx.shards, grad_hidden).to(student_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(student_weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(student_bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def autocast_inputs(
    hidden: torch.Tensor,
    head: LMHead,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[LMHead] = None,
) -> tuple[torch.Tensor, LMHead, Optional[torch.Tensor], Optional[LMHead]]:
    """The inputs as autocast hands a matmul its operands: where autocast is on for `hidden`'s
    device, each floating tensor other than float64 in its dtype (differentiable casts, so the
    gradients reach the caller's tensors in their dtypes); elsewhere the inputs themselves."""
    dtype = autocast_dtype(hidden.device) if isinstance(hidden, torch.Tensor) else None
    if dtype is None:
        return hidden, head, teacher_hidden, teacher_head

    def cast(x):
        eligible = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
        return x.to(dtype) if eligible else x

    def cast_head(h: Optional[LMHead]) -> Optional[LMHead]:
        return h if h is None or cast(h.weight) is h.weight else h.to(dtype)

    cast_student = cast_head(head)
    assert cast_student is not None
    return cast(hidden), cast_student, cast(teacher_hidden), cast_head(teacher_head)


def autocast_off(device: torch.device) -> AbstractContextManager:
    """Autocast off on `device` while a kernel runs (nothing to enter where it is not on, so a
    device without autocast support is never asked to turn it off)."""
    return torch.autocast(device.type, enabled=False) if autocast_dtype(device) is not None else nullcontext()


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """Autocast's dtype where it is on for `device`; None where it is off, or unknown to autocast
    (`meta`, a backend that registered none), which then cannot be on."""
    try:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    except RuntimeError:  # "unknown device type for autocast"
        return None


class PreparedCall(NamedTuple):
    """What an entry point runs its kernels on, made by `prepare_call` (run them under `autocast_off`)."""

    hidden: torch.Tensor  # [N, D_s] student hidden states, in autocast's dtype where autocast is on
    head: LMHead  # the student's head: its first `vocab_size` rows (views), cast as `hidden`
    teacher_hidden: Optional[torch.Tensor]  # [N, D_t], cast as `hidden`; None without a teacher
    teacher_head: Optional[LMHead]  # cut and cast as `head`; None without a teacher
    problem: StatsProblem  # the checked problem, this shard's part of it under a vocab group
    targets: torch.Tensor  # [N] target ids, shard-local under a vocab group
    valid: torch.Tensor  # [N] bool, rows whose target is not ignore_index
    shards: Optional[vocab_parallel.VocabShards]  # the vocabulary shards, None unsharded
    backend: str  # the resolved backend


def prepare_call(
    hidden: torch.Tensor,
    head: HeadLike,
    targets: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[HeadLike] = None,
    *,
    backend: str,
    vocab_size: Optional[int],
    vocab_process_group: Optional[ProcessGroup],
    reduce_hidden_grad: bool,
    **checks,
) -> PreparedCall:
    """The one dispatch point of every public entry point: the heads as `LMHead`s cut to the
    tokenizer's `vocab_size` rows (padded heads), the inputs as autocast hands a matmul its
    operands (`autocast_inputs`), the one input check (`validate_stats_inputs`, with `checks` as
    its keywords), the vocabulary shards of a sharded head with shard-local targets, and the
    backend that will run."""
    given = as_head(head, "head"), None if teacher_head is None else as_head(teacher_head, "teacher_head")
    student, teacher = vocab_parallel.valid_head_rows(vocab_size, vocab_process_group, *given)
    assert student is not None
    hidden, student, teacher_hidden, teacher = autocast_inputs(hidden, student, teacher_hidden, teacher)
    shards = None
    if vocab_process_group is not None:
        if backend == "reference":
            raise ValueError(
                "vocab_process_group needs a streaming backend ('auto', 'chunked' or 'triton'); "
                "backend='reference' materializes the whole vocabulary's logits"
            )
        shards = vocab_parallel.shards_of(student.weight, vocab_process_group, reduce_hidden_grad)
    problem = validate_stats_inputs(
        hidden,
        student,
        targets,
        teacher_hidden,
        teacher,
        backend=backend,
        target_vocab_size=shards.vocab_size if shards is not None else None,
        **checks,
    )
    valid = targets != problem.ignore_index
    if shards is not None:  # the backends see the shard: local target ids, a local ignore_index
        targets, problem = shards.localize(targets, problem)
    backend = resolve_backend(backend, hidden.device)
    return PreparedCall(hidden, student, teacher_hidden, teacher, problem, targets, valid, shards, backend)


def _stats(
    student_hidden: torch.Tensor,
    head: HeadLike,
    targets: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor],
    teacher_head: Optional[HeadLike],
    *,
    vocab_size: Optional[int],
    vocab_process_group: Optional[ProcessGroup],
    reduce_hidden_grad: bool,
    backend: str,
    **checks,
) -> tuple[Optional[torch.Tensor], ...]:
    """The statistics of `token_stats` / `teacher_student_stats` (`checks`: their remaining
    keywords, for `validate_stats_inputs`)."""
    call = prepare_call(
        student_hidden,
        head,
        targets,
        teacher_hidden,
        teacher_head,
        backend=backend,
        vocab_size=vocab_size,
        vocab_process_group=vocab_process_group,
        reduce_hidden_grad=reduce_hidden_grad,
        **checks,
    )
    problem, student, teacher = call.problem, call.head, call.teacher_head
    teacher_hidden = call.teacher_hidden
    teacher_weight, teacher_bias = (None, None) if teacher is None else (teacher.weight, teacher.bias)
    with autocast_off(call.hidden.device):  # the products in the (cast) inputs' dtypes (module doc)
        if call.backend == "reference":
            return reference_stats(
                problem,
                call.hidden,
                student.weight,
                call.targets,
                teacher_hidden,
                teacher_weight,
                student_bias=student.bias,
                teacher_bias=teacher_bias,
            )
        if teacher_hidden is not None and teacher_weight is not None:
            teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
            teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
        outputs = FusedTokenStatsFunction.apply(
            call.hidden,
            student.weight,
            student.bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            call.targets,
            problem,
            call.backend,
            call.shards,
        )
    return tuple(outputs[:2]) + tuple(
        outputs[i] if ok else None
        for i, ok in ((2, problem.has_teacher), (3, problem.has_teacher), (4, problem.divergence != DIV_NONE))
    )


def token_stats(
    hidden: torch.Tensor,
    head: HeadLike,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_size: Optional[int] = None,
    vocab_process_group: Optional[ProcessGroup] = None,
    reduce_hidden_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of the target token and full-vocab entropy of softmax(z), with logits
    z = logit_softcap * tanh(((hidden @ weight.T + bias) * logit_scale) / logit_softcap) / temperature.

    Args:
        hidden: [N, D] hidden states (fp16 / bf16 / fp32; fp64 on chunked and reference).
        head: the lm_head: its [V, D] weight (same dtype as `hidden`), or an `LMHead` with a bias
            [V] (it gets a gradient when it requires one), a logit scale or a soft-cap.
        targets: [N] integer token ids in [0, V), or `ignore_index` (those rows give 0, get 0 gradient).
        vocab_size: the tokenizer's vocabulary size when the head has padding rows past it (models
            round V up: Qwen2.5-7B has 152,064 rows for 151,665 tokens). Rows at or past it take
            no part in the softmax and get zero gradient; the weight is sliced (a view), never
            copied. With `vocab_process_group`, the whole vocabulary's size. None: every row.
        vocab_process_group: a torch.distributed group over which the vocabulary is sharded: each
            rank passes its contiguous shard of lm_head rows (and bias) in rank order, the full
            hidden states and the global targets, and gets the unsharded outputs; the weight
            gradient is the rank's shard's, the hidden-state gradient is complete on every rank
            (fire_kernels/vocab_parallel.py; chunked or triton backend; O(N) floats communicated per
            statistic in the forward, dL/dh [N, D] in the backward).
        reduce_hidden_grad: with `vocab_process_group`, False returns this shard's part of dL/dh
            (not all-reduced), for callers whose layer before the head reduces it (Megatron's
            column-parallel input copy; verl's `linear_cross_entropy` contract).
    Returns:
        (log_prob [N], entropy [N]) in float32 (float64 for float64 inputs), both differentiable
        w.r.t. `hidden` and the head. The [N, V] logits are never materialized (except by "reference").
    """
    log_prob, entropy, *_ = _stats(
        hidden, head, targets, None, None, temperature=temperature, divergence=None, jsd_beta=0.5,
        ignore_index=ignore_index, backend=backend, hidden_name="hidden", vocab_process_group=vocab_process_group,
        reduce_hidden_grad=reduce_hidden_grad, vocab_size=vocab_size,
    )  # fmt: skip
    assert log_prob is not None and entropy is not None
    return log_prob, entropy


def teacher_student_stats(
    student_hidden: torch.Tensor,
    head: HeadLike,
    teacher_hidden: torch.Tensor,
    teacher_head: HeadLike,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence: Optional[str] = None,
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_size: Optional[int] = None,
    vocab_process_group: Optional[ProcessGroup] = None,
    reduce_hidden_grad: bool = True,
) -> TeacherStudentStats:
    """Student and teacher log-prob / entropy, and optionally a full-vocab divergence, in one sweep.

    Args:
        student_hidden: [N, D_s]; head: the student's lm_head, [V, D_s] weight or `LMHead`.
        teacher_hidden: [N, D_t]; teacher_head: the teacher's, [V, D_t] or `LMHead` (same V; D may
            differ; its bias gets no gradient).
        targets: [N] sampled token ids, or `ignore_index`.
        divergence: None, "reverse_kl" (KL(student || teacher)), "forward_kl" (KL(teacher || student))
            or "jsd" (generalized JSD; `jsd_beta` 0 is forward KL, 1 is reverse KL, as in TRL / Liger).
        vocab_size: the tokenizer's vocabulary when either head has padding rows past it, as in
            `token_stats`: the two heads may then have different numbers of rows.
        vocab_process_group: vocabulary-sharded lm_heads of student and teacher (the same rows on
            each rank), as in `token_stats`; every divergence is exact. `reduce_hidden_grad` as there.
    Returns:
        TeacherStudentStats of [N] tensors. Student outputs and the divergence are differentiable
        w.r.t. the student hidden states and head; teacher outputs carry no gradient.
    """
    if teacher_hidden is None or teacher_head is None:
        raise ValueError("teacher_hidden and teacher_head are required; use token_stats for the student alone")
    outputs = _stats(
        student_hidden, head, targets, teacher_hidden, teacher_head, temperature=temperature, divergence=divergence,
        jsd_beta=jsd_beta, ignore_index=ignore_index, backend=backend, hidden_name="student_hidden",
        vocab_process_group=vocab_process_group, reduce_hidden_grad=reduce_hidden_grad, vocab_size=vocab_size,
    )  # fmt: skip
    return TeacherStudentStats(*outputs)  # type: ignore[arg-type]  # the student's fields are tensors
