"""Fused student update: per-token statistic, loss and gradients formed in the forward sweep.

In a distillation step the teacher statistics and advantages are known before the update,
so the derivative of the loss w.r.t. each token's log-prob, g_t = dL/d log p(y_t), depends
only on log p(y_t) itself. The caller supplies it as `grad_fn`, and the gradients w.r.t.
hidden states and lm_head weight are formed while the logits are on hand (as Liger's fused
linear cross-entropy does):

    z = h W^T / tau            lse = logsumexp(z)        lp = z_y - lse
    loss, g = grad_fn(lp)      dz = g (onehot(y) - p) / tau
    dh = dz W                  dW = dz^T h

chunked: whole vocabulary rows (lse must be known before dz) when every row of the call fits
         in the statistics' working set (`_whole_row_limit`): 3 matrix products. A larger call
         takes the statistics' streaming tiles (forward, then the backward's recompute:
         4 products), so no fused update holds more than the statistics do, at any N.
triton:  the streaming forward kernel gives lse (1 product), then the one-recompute backward
         kernel forms dz on-chip (1 + 2 products); no [N, V] or [chunk, V] buffer.
chunked on CUDA: the same two passes on cuBLAS tiles with Triton folds (`tile_fold`): whole
         vocabulary rows would mean chains of elementwise ops over [chunk, V] in HBM.

`linear_divergence_update` does the same for the dense objective, loss = sum_t c_t D_t(p || q)
with per-token coefficients c known before the sweep (q the teacher, u = g U^T / tau):

    dz = c * dD/dz / tau,   reverse KL: p (log p - log q - KL);  forward KL: p - q;
                            JSD_beta: (1 - beta) p (log p - log M - KL(p||M))

chunked: whole rows of z and u (each D needs both final lse values and, for KL / JSD, its own
         value before dz exists) when they fit as above: 2 student + 1 teacher products against
         5 + 2 for the autograd path (forward sweep, then backward recompute); else the
         statistics' streaming tiles.
triton:  the forward kernel (z and u tiles on-chip) then the backward kernel with upstream
         gradient c on the divergence.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, TypeVar

import torch
from torch.distributed import ProcessGroup

from fire_kernels.backends import chunked, tile_fold, triton_token_stats
from fire_kernels.backends._row_stats import BackwardInputs
from fire_kernels.backends.chunked import (
    apply_head_,
    divergence_grad_terms,
    full_row_divergence,
    head_jacobian,
    row_logsumexp,
    scale_by_jacobian_,
)
from fire_kernels.lm_head import HeadLike, LMHead, as_head
from fire_kernels.token_stats import PreparedCall, autocast_off, prepare_call
from fire_kernels.vocab_parallel import complete_hidden_grad

# grad_fn(log_prob[C], rows: slice) -> (loss contribution (scalar), dL/dlog_prob [C])
GradFn = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


def _whole_row_limit(vocab: int, buffers: int, divergence: int) -> int:
    """The most rows whose `buffers` [rows, V] fp32 temporaries fit in the chunked statistics'
    working set for `divergence` (`chunked.working_set_tiles` [token_chunk, vocab_chunk] tiles).
    Read at call time, as the tile shape is."""
    tile = chunked.DEFAULT_TOKEN_CHUNK * chunked.DEFAULT_VOCAB_CHUNK
    return max(1, chunked.working_set_tiles(divergence) * tile // max(buffers * vocab, 1))


class LogprobUpdate(NamedTuple):
    log_prob: torch.Tensor  # [N] float32, 0 on ignored rows
    loss: torch.Tensor  # scalar, the sum of grad_fn's contributions
    grad_hidden: torch.Tensor  # [N, D] in hidden's dtype
    grad_weight: torch.Tensor  # [V, D] in weight's dtype
    grad_bias: Optional[torch.Tensor] = None  # [V] in bias's dtype, when a bias was given


def linear_log_prob_update(
    hidden: torch.Tensor,
    head: HeadLike,
    targets: torch.Tensor,
    grad_fn: GradFn,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_size: Optional[int] = None,
    vocab_process_group: Optional[ProcessGroup] = None,
    reduce_hidden_grad: bool = True,
) -> LogprobUpdate:
    """Log-probs of `targets` under the head's softmax (that of `token_stats`) and the gradients
    of `loss = sum grad_fn(...)[0]` w.r.t. hidden [N, D] and the head's weight [V, D] (and its
    bias [V] when it has one), in one sweep.

    `grad_fn` sees the log-probs of a chunk of rows (0 on ignored rows) and the slice of rows
    they are; it returns that chunk's loss contribution and dL/dlog_prob. Ignored rows get no
    gradient whatever it returns.

    `vocab_process_group`, `reduce_hidden_grad`: a vocabulary-sharded head, as in `token_stats`
    (the streaming two-pass path on every device; `grad_weight` is the shard's). `vocab_size`:
    padded heads, as in `token_stats`; the padding rows' gradient is zero.
    """
    call = prepare_call(
        hidden, head, targets, backend=backend, vocab_size=vocab_size, vocab_process_group=vocab_process_group,
        reduce_hidden_grad=reduce_hidden_grad, temperature=temperature, ignore_index=ignore_index,
        hidden_name="hidden",
    )  # fmt: skip
    with autocast_off(hidden.device):  # the products in the (cast) inputs' dtypes (token_stats' doc)
        update = _log_prob_sweep(call, grad_fn)
    return _as_callers(update, hidden, as_head(head))


def _log_prob_sweep(call: PreparedCall, grad_fn: GradFn) -> LogprobUpdate:
    """`linear_log_prob_update` on its prepared inputs."""
    problem, hidden, targets, valid = call.problem, call.hidden, call.targets, call.valid
    weight, bias = call.head.weight, call.head.bias
    bias = bias.detach() if bias is not None else None
    # the whole-row path's buffers: the logits / p / dz tile and logsumexp's temporary (+ the soft-cap Jacobian)
    rows_per_chunk = _whole_row_limit(problem.vocab_size, 3 if problem.student_head.softcap else 2, problem.divergence)
    passes = _two_pass(call, whole_rows=problem.num_tokens <= rows_per_chunk)
    if passes is not None:
        return LogprobUpdate(*_streaming_update(call, passes, grad_fn=grad_fn))

    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n, vocab = problem.num_tokens, problem.vocab_size
    inv_t = problem.inv_temperature
    log_prob = torch.zeros(n, dtype=acc, device=hidden.device)
    grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    # Made by the first chunk's product (no zero-fill pass over the V x D buffer, which on the CPU
    # costs as much as a third of a product), after the logits: the two are never live with
    # logsumexp's temporaries, so the peak stays at the materialized path's.
    weight_grad: Optional[torch.Tensor] = None
    weight_acc = weight.to(acc)  # a no-op for fp32 weights
    spec = problem.student_head
    grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if bias is not None else None
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n))
        h = hidden[rows].to(acc)
        y, ok = targets[rows], valid[rows]
        safe_y = torch.where(ok, y, torch.zeros_like(y)).long()
        probs = apply_head_(h @ weight_acc.t(), spec, bias, inv_t)  # [C, V] logits, becomes p, then dz in place
        jacobian = head_jacobian(probs, spec, inv_t)  # dz/dr: scale / tau, or a [C, V] tile under a soft-cap
        lse = row_logsumexp(probs)
        lp = torch.where(ok, probs.gather(1, safe_y[:, None]).squeeze(1) - lse, 0.0)
        log_prob[rows] = lp
        chunk_loss, g = grad_fn(lp, rows)
        loss = loss + chunk_loss.to(acc)
        g = torch.where(ok, g.to(acc), 0.0)
        if not bool((g != 0).any()):
            continue
        probs.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # dz = -g p
        probs[torch.arange(probs.shape[0], device=probs.device), safe_y] += g  # + g onehot(y)
        probs = scale_by_jacobian_(probs, jacobian)  # dL/dr, r = h W^T + b
        if grad_bias is not None:
            grad_bias += probs.sum(dim=0)
        torch.mm(probs, weight_acc, out=grad_hidden[rows])
        weight_grad = torch.mm(probs.t(), h) if weight_grad is None else weight_grad.addmm_(probs.t(), h)
    if weight_grad is None:  # no row carried gradient
        weight_grad = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    return LogprobUpdate(
        log_prob, loss, grad_hidden.to(hidden.dtype), weight_grad.to(weight.dtype), _cast(grad_bias, bias)
    )


def _as_callers(update: UpdateT, hidden: torch.Tensor, head: LMHead) -> UpdateT:
    """An update whose gradients are shaped and typed as the caller's `hidden` and `head`: in
    their dtypes (under autocast the sweep ran on cast copies), the weight (and bias) gradient
    covering the head's padding rows too (zero)."""
    bias = head.bias
    grad_weight = _pad_rows(update.grad_weight.to(head.weight.dtype), head.weight.shape[0])
    grad_bias = None if bias is None else _pad_rows(_cast(update.grad_bias, bias), bias.shape[0])
    assert grad_weight is not None
    grad_hidden = update.grad_hidden.to(hidden.dtype)
    return update._replace(grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias)


def _pad_rows(grad: Optional[torch.Tensor], rows: Optional[int]) -> Optional[torch.Tensor]:
    """A gradient of a head's valid rows, with zero rows for the padding after them."""
    if grad is None or rows is None or grad.shape[0] == rows:
        return grad
    padded = grad.new_zeros((rows, *grad.shape[1:]))
    padded[: grad.shape[0]] = grad
    return padded


def _two_pass(call: PreparedCall, *, whole_rows: bool):
    """(forward, backward) of the streaming path for the call's backend and device, or None for the
    whole-row torch path: chunked on the CPU, when the call's rows fit in the statistics'
    working set (`whole_rows`) and one process holds the whole vocabulary (a sharded one takes
    the chunked backend's streaming passes)."""
    if call.backend == "triton":
        return triton_token_stats.triton_forward, triton_token_stats.triton_backward
    if tile_fold.enabled(call.hidden.device):
        return tile_fold.fold_forward, tile_fold.fold_backward
    if call.shards is not None or not whole_rows:
        return chunked.chunked_forward, chunked.chunked_backward
    return None


def _streaming_update(
    call: PreparedCall, passes, *, grad_fn: Optional[GradFn] = None, coefficient: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Both fused updates on the streaming path (`_two_pass`'s forward and backward): the forward
    gives the row statistics, the upstream gradients are formed from them (`grad_fn`'s dL/dlog p
    for the log-prob update, the `coefficient` on the divergence for the divergence update), and
    the backward recomputes the tiles. Returns (per-token values, loss, grad_hidden, grad_weight,
    grad_bias) in the fields' order of `LogprobUpdate` / `DivergenceUpdate`."""
    forward, backward = passes
    problem, head, teacher = call.problem, call.head, call.teacher_head
    bias = head.bias.detach() if head.bias is not None else None
    teacher_hidden = teacher_weight = teacher_bias = None
    if call.teacher_hidden is not None and teacher is not None:
        teacher_hidden, teacher_weight = call.teacher_hidden.detach(), teacher.weight.detach()
        teacher_bias = teacher.bias.detach() if teacher.bias is not None else None
    stats, div_aux = forward(
        problem,
        call.hidden,
        head.weight,
        call.targets,
        teacher_hidden,
        teacher_weight,
        student_bias=bias,
        teacher_bias=teacher_bias,
        shards=call.shards,
    )
    acc = stats.student_lse.dtype
    grad_divergence: Optional[torch.Tensor] = None
    if coefficient is None:  # the log-prob update
        assert grad_fn is not None
        loss, grad_log_prob = grad_fn(stats.student_log_prob, slice(0, problem.num_tokens))
        grad_log_prob = torch.where(call.valid, grad_log_prob.to(acc), 0.0)
        grad_entropy = torch.zeros_like(grad_log_prob)
        values = stats.student_log_prob
    else:  # the divergence update
        grad_divergence = torch.where(call.valid, coefficient.detach().to(acc), 0.0)
        loss = (grad_divergence * stats.divergence).sum()
        grad_log_prob = grad_entropy = torch.zeros_like(grad_divergence)
        values = stats.divergence
    inputs = BackwardInputs(
        call.hidden, head.weight, call.targets, teacher_hidden, teacher_weight, stats.student_lse,
        stats.student_entropy, stats.teacher_lse, div_aux, grad_log_prob, grad_entropy, grad_divergence,
        student_bias=bias, teacher_bias=teacher_bias,
    )  # fmt: skip
    grad_hidden, grad_weight, grad_bias = backward(problem, inputs, need_bias_grad=bias is not None)
    grad_hidden = complete_hidden_grad(call.shards, grad_hidden)
    return values, loss, grad_hidden.to(call.hidden.dtype), grad_weight.to(head.weight.dtype), _cast(grad_bias, bias)


def _cast(grad: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if grad is None or like is None else grad.to(like.dtype)


class DivergenceUpdate(NamedTuple):
    divergence: torch.Tensor  # [N] float32 D_t(p || q), 0 on ignored rows
    loss: torch.Tensor  # scalar, sum_t c_t D_t
    grad_hidden: torch.Tensor  # [N, D_s] in student_hidden's dtype
    grad_weight: torch.Tensor  # [V, D_s] in student_weight's dtype
    grad_bias: Optional[torch.Tensor] = None  # [V] in bias's dtype, when a student bias was given


UpdateT = TypeVar("UpdateT", LogprobUpdate, DivergenceUpdate)


def linear_divergence_update(
    student_hidden: torch.Tensor,
    head: HeadLike,
    teacher_hidden: torch.Tensor,
    teacher_head: HeadLike,
    targets: torch.Tensor,
    coefficient: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_size: Optional[int] = None,
    vocab_process_group: Optional[ProcessGroup] = None,
    reduce_hidden_grad: bool = True,
) -> DivergenceUpdate:
    """Per-token full-vocabulary divergence D_t between the student's softmax (`head`) and the
    teacher's (`teacher_head`), and the gradients of loss = sum_t coefficient_t * D_t w.r.t.
    student_hidden [N, D_s] and the student head's weight [V, D_s] (and bias), in one sweep.

    `targets` [N] only marks rows: those equal to `ignore_index` give D = 0 and no gradient.
    `coefficient` [N] is detached (the caller's aggregation and FiRe weights). `divergence` is
    "reverse_kl" KL(student || teacher), "forward_kl" KL(teacher || student) or "jsd"
    (generalized, `jsd_beta` 0 forward and 1 reverse KL, as in TRL and Liger). The heads are
    those of `teacher_student_stats`. `vocab_process_group`, `reduce_hidden_grad`:
    vocabulary-sharded heads, as in `linear_log_prob_update`. `vocab_size`: padded heads (the two
    may have different numbers of rows), as in `teacher_student_stats`; the padding rows'
    gradient is zero.
    """
    if divergence is None:
        raise ValueError("divergence must be 'reverse_kl', 'forward_kl' or 'jsd', got None")
    call = prepare_call(
        student_hidden, head, targets, teacher_hidden, teacher_head, backend=backend, vocab_size=vocab_size,
        vocab_process_group=vocab_process_group, reduce_hidden_grad=reduce_hidden_grad, temperature=temperature,
        divergence=divergence, jsd_beta=jsd_beta, ignore_index=ignore_index,
    )  # fmt: skip
    if not isinstance(coefficient, torch.Tensor) or coefficient.shape != (call.problem.num_tokens,):
        raise ValueError(
            f"coefficient must be a [{call.problem.num_tokens}] tensor, got "
            f"{getattr(coefficient, 'shape', type(coefficient).__name__)}"
        )
    with autocast_off(student_hidden.device):  # the products in the (cast) inputs' dtypes (token_stats' doc)
        update = _divergence_sweep(call, coefficient)
    return _as_callers(update, student_hidden, as_head(head))


def _divergence_sweep(call: PreparedCall, coefficient: torch.Tensor) -> DivergenceUpdate:
    """`linear_divergence_update` on its prepared inputs."""
    problem, student_hidden, valid = call.problem, call.hidden, call.valid
    kind, beta = problem.divergence, problem.jsd_beta
    # the whole-row path's buffers: log p (in z), log q (in u), p, and two temporaries (+ the soft-cap Jacobian)
    rows_per_chunk = _whole_row_limit(problem.vocab_size, 6 if problem.student_head.softcap else 5, kind)
    passes = _two_pass(call, whole_rows=problem.num_tokens <= rows_per_chunk)
    if passes is not None:
        return DivergenceUpdate(*_streaming_update(call, passes, coefficient=coefficient))

    assert call.teacher_hidden is not None and call.teacher_head is not None  # prepare_call checked them
    student_weight, bias = call.head.weight, call.head.bias
    teacher_hidden, teacher_weight = call.teacher_hidden.detach(), call.teacher_head.weight.detach()
    teacher_bias = call.teacher_head.bias
    bias = bias.detach() if bias is not None else None
    teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    n, vocab = problem.num_tokens, problem.vocab_size
    inv_t = problem.inv_temperature
    dev = student_hidden.device
    coef_all = torch.where(valid, coefficient.detach().to(acc), 0.0)
    values = torch.zeros(n, dtype=acc, device=dev)
    grad_hidden = torch.zeros(student_hidden.shape, dtype=acc, device=dev)
    weight_grad: Optional[torch.Tensor] = None  # made by the first chunk's product (see above)
    student_w, teacher_w = student_weight.to(acc), teacher_weight.to(acc)
    s_head, t_head = problem.student_head, problem.teacher_head
    grad_bias = torch.zeros(vocab, dtype=acc, device=dev) if bias is not None else None
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n))
        ok, coef = valid[rows], coef_all[rows]
        if not bool(ok.any()):
            continue
        h = student_hidden[rows].to(acc)
        z = apply_head_(h @ student_w.t(), s_head, bias, inv_t)
        u = apply_head_(teacher_hidden[rows].to(acc) @ teacher_w.t(), t_head, teacher_bias, inv_t)
        jacobian = head_jacobian(z, s_head, inv_t)  # before z becomes log p
        log_p = z.sub_(row_logsumexp(z)[:, None])
        log_q = u.sub_(row_logsumexp(u)[:, None])
        p = log_p.exp()
        value, aux = full_row_divergence(log_p, p, log_q, kind, beta)
        values[rows] = torch.where(ok, value, 0.0)
        if not bool((coef != 0).any()):
            continue
        coef_p, extra = divergence_grad_terms(log_p, log_q, aux, coef, kind, beta)
        dz = p.mul_(coef_p)  # dz = (p * coef + extra) / tau, formed in p's buffer
        if extra is not None:
            dz.add_(extra)
        dz = scale_by_jacobian_(dz, jacobian)  # dL/dr, r = h W^T + b
        if grad_bias is not None:
            grad_bias += dz.sum(dim=0)
        torch.mm(dz, student_w, out=grad_hidden[rows])
        weight_grad = torch.mm(dz.t(), h) if weight_grad is None else weight_grad.addmm_(dz.t(), h)
    if weight_grad is None:  # no row carried gradient
        weight_grad = torch.zeros(student_weight.shape, dtype=acc, device=dev)
    loss = (coef_all * values).sum()
    return DivergenceUpdate(
        values, loss, grad_hidden.to(student_hidden.dtype), weight_grad.to(student_weight.dtype), _cast(grad_bias, bias)
    )
