"""Chunked backend: pure PyTorch, bounded [token_chunk, vocab_chunk] logit tiles, recompute in backward.

This is the CPU path and the fallback on any device. It runs the same streaming algorithm as
the Triton kernels (see `_row_stats.py`), one tile at a time:

    forward   for each token chunk, for each vocab chunk: z = h W_c^T / tau (and u for the
              teacher), update the per-row online state (m, S, A, z_y, KL cross term).
              Generalized JSD needs the final lse of both models, so it takes a second sweep.
    backward  for each tile: recompute z (and u when a divergence has a gradient), form
              dL/dz from the saved per-row lse / entropy / divergence, then
              dh[chunk] += dz @ W_c,  dW[c] += dz^T @ h[chunk].

Per-tile gradient w.r.t. the student logits z (p = softmax z, q = softmax u, upstream
gradients g_lp, g_H, g_D per row, all multiplied by 1/tau for z = W h / tau):

    d log p(y)   = onehot(y) - p
    d H          = -p * (log p + H)
    d KL(p||q)   = p * (log p - log q - KL(p||q))
    d KL(q||p)   = p - q
    d JSD_beta   = (1 - beta) * p * (log p - log M - KL(p||M)),   M = (1 - beta) p + beta q

Heads: with r = h W^T + b, z = softcap tanh(r scale / softcap) / tau, so
dz/dr = (scale / tau) (1 - t^2) with t = tanh(.) = z tau / softcap, read off the recomputed z;
without a soft-cap dz/dr = scale / tau. dL/db = sum over rows of dL/dr.

Extra memory beyond inputs and gradients: a few tiles of token_chunk * vocab_chunk floats
plus O(N) row state; float32 accumulation (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fire_kernels._validation import (
    DIV_FORWARD_KL,
    DIV_JSD,
    DIV_NONE,
    DIV_REVERSE_KL,
    PLAIN_HEAD,
    HeadSpec,
    StatsProblem,
)
from fire_kernels.backends import tile_fold
from fire_kernels.backends._row_stats import BackwardInputs, RowStats, StreamState, finalize, finish_jsd
from fire_kernels.vocab_parallel import VocabShards

# Tile shape. Read at call time, so tests can shrink them to force many tiles on small shapes.
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 4096


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class TileBuffers:
    """Scratch memory for the tiles of one call: `get(i, rows, cols)` is the i-th [rows, cols]
    tile, a view of one flat buffer at offset i * rows * cols. A tile lives for one iteration of
    the tile loop (the next iteration's views may overlap it), so the last, smaller tiles of a row
    or of the vocabulary, and JSD's half-height tiles, reuse the same memory.

    Why: the softmax passes write into these views instead of fresh tensors. On the CPU a fresh
    4-16 MiB tensor is a fresh mapping from the C allocator whose first touch page-faults (an
    out-of-place pass over a 256 x 4096 fp32 tile measured ~1.8 ms against ~0.07 ms in place)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self._flat = torch.empty(numel, dtype=dtype, device=device)

    def get(self, index: int, rows: int, cols: int) -> torch.Tensor:
        size = rows * cols
        return self._flat[index * size : (index + 1) * size].view(rows, cols)


def working_set_tiles(divergence: int) -> int:
    """How many [token_chunk, vocab_chunk] tiles `chunked_forward` holds: z, e = exp(z - m) and a
    scratch tile (z - m, then u; the teacher's u - m_u goes to z's spent tile), and a fourth for
    forward KL, whose cross term needs z after the teacher's update. The backward and JSD's
    second sweep fit in as many."""
    return 4 if divergence == DIV_FORWARD_KL else 3


def _logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    inv_temperature: float,
    acc: torch.dtype,
    head: HeadSpec = PLAIN_HEAD,
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # Upcast before the product so half-precision logits are not rounded (same as the fp32
    # accumulator of the Triton kernel); the upcast copy is one bounded weight chunk.
    return apply_head_(torch.mm(hidden.to(acc), weight.to(acc).t(), out=out), head, bias, inv_temperature)


def apply_head_(r: torch.Tensor, head: HeadSpec, bias: Optional[torch.Tensor], inv_temperature: float) -> torch.Tensor:
    """In place on a fresh [rows, cols] tile r = h W_c^T: z = softcap tanh((r + b_c) scale / softcap) / tau.
    `bias` is the tile's slice of columns (None when the head has none)."""
    if bias is not None:
        r.add_(bias.to(r.dtype))
    if head.softcap:
        return r.mul_(head.scale / head.softcap).tanh_().mul_(head.softcap * inv_temperature)
    factor = head.scale * inv_temperature
    return r if factor == 1.0 else r.mul_(factor)  # a plain head at tau = 1: no pass over the tile


def scale_by_jacobian_(dz: torch.Tensor, jacobian) -> torch.Tensor:
    """dL/dr = dL/dz * dz/dr in place (`head_jacobian`'s tile or scalar; 1.0 costs no pass)."""
    return dz if isinstance(jacobian, float) and jacobian == 1.0 else dz.mul_(jacobian)


def head_jacobian(z: torch.Tensor, head: HeadSpec, inv_temperature: float):
    """dz/dr of `apply_head_`, from the finished logits z: a [rows, cols] tensor with a soft-cap,
    else the scalar scale / tau."""
    if head.softcap:
        t = z * (1.0 / (head.softcap * inv_temperature))
        return t.mul_(t).neg_().add_(1.0).mul_(head.scale * inv_temperature)
    return head.scale * inv_temperature


def _columns(bias: Optional[torch.Tensor], cols: slice) -> Optional[torch.Tensor]:
    return None if bias is None else bias[cols]


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over each row of a [rows, V] tile, with temporaries of [rows, vocab_chunk] only
    (torch.logsumexp holds a whole [rows, V] exp)."""
    m = x.amax(dim=1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf: lse -inf, not nan
    total = torch.zeros_like(m)
    for v0 in range(0, x.shape[1], DEFAULT_VOCAB_CHUNK):
        total += torch.sub(x[:, v0 : v0 + DEFAULT_VOCAB_CHUNK], m[:, None]).exp_().sum(dim=1)
    return m + total.log()


def _row_dot_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_j x_ij y_ij per row, overwriting x with x * y: two vectorized passes, no temporary
    (a batched GEMV `x[:, None] @ y[..., None]` measured ~4x slower on the CPU)."""
    return x.mul_(y).sum(dim=1)


def _online_update(m, s, a, z, shifted, e):
    """One tile of the streaming softmax state (see _row_stats.py). `shifted` and `e` are scratch
    tiles of z's shape; on return e holds exp(z - m') for the caller. Returns (m', s, a, scale)."""
    m_new = torch.maximum(m, z.amax(dim=1))
    scale = torch.exp(m - m_new)
    torch.sub(z, m_new[:, None], out=shifted)
    torch.exp(shifted, out=e)
    a = scale * (a + (m - m_new) * s) + _row_dot_(shifted, e)
    s = scale * s + e.sum(dim=1)
    return m_new, s, a, scale


def _target_logit(z: torch.Tensor, targets: torch.Tensor, v0: int) -> torch.Tensor:
    local = targets - v0
    in_tile = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(in_tile, picked, torch.zeros((), dtype=z.dtype, device=z.device))


def _jsd_log_mixture(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    beta: float,
    out: Optional[torch.Tensor] = None,
    scratch: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log M = log((1 - beta) p + beta q) into `out`, with `scratch` (or a temporary) for log q + log beta."""
    out = torch.add(log_p, math.log(1.0 - beta), out=out)
    return torch.logaddexp(out, torch.add(log_q, math.log(beta), out=scratch), out=out)


def chunked_forward(
    problem: StatsProblem,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    shards: Optional[VocabShards] = None,
) -> tuple[RowStats, Optional[torch.Tensor]]:
    """Streaming forward. Returns the row statistics and `div_aux`, the per-row scalar the
    divergence backward needs (KL(p||q) for reverse KL, KL(p||M) for JSD, else None).
    On CUDA the tiles are folded by Triton kernels (`tile_fold`), here by torch ops. With
    `shards` the weights are this rank's vocabulary shard and the results the whole
    vocabulary's (`vocab_parallel`)."""
    if tile_fold.enabled(student_hidden.device) and student_hidden.dtype != torch.float64:
        return tile_fold.fold_forward(
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
    token_chunk, vocab_chunk = DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK  # module constants: tests shrink them
    n, vocab = problem.num_tokens, problem.vocab_size
    acc = _acc_dtype(student_hidden)
    dev = student_hidden.device
    inv_t = problem.inv_temperature
    teacher = problem.has_teacher
    kind = problem.divergence
    s_head, t_head = problem.student_head, problem.teacher_head
    lowest = torch.finfo(acc).min  # finite "-inf": (m - m_new) * S stays 0 * finite

    def new_state():
        return (
            torch.full((n,), lowest, dtype=acc, device=dev),
            torch.zeros(n, dtype=acc, device=dev),
            torch.zeros(n, dtype=acc, device=dev),
            torch.zeros(n, dtype=acc, device=dev),
        )

    m_s, s_s, a_s, zy = new_state()
    m_t, s_t, a_t, uy = new_state() if teacher else (None,) * 4
    cross = torch.zeros(n, dtype=acc, device=dev) if kind in (DIV_REVERSE_KL, DIV_FORWARD_KL) else None
    # The working set (`working_set_tiles`), reused by every tile so that it grows with neither N nor V.
    tile_rows, tile_cols = min(token_chunk, n), min(vocab_chunk, vocab)
    jsd_rows = max(1, token_chunk // 2)  # JSD's second sweep: 4 half-height tiles (below)
    jsd_numel = 4 * min(jsd_rows, n) * tile_cols if kind == DIV_JSD else 0
    tiles = TileBuffers(max(working_set_tiles(kind) * tile_rows * tile_cols, jsd_numel), acc, dev)
    Z, SCRATCH, E, TEACHER_SCRATCH = 0, 1, 2, 3 if kind == DIV_FORWARD_KL else 0

    for n0 in range(0, n, token_chunk):
        rows = slice(n0, min(n0 + token_chunk, n))
        h_s, y = student_hidden[rows], targets[rows]
        h_t = teacher_hidden[rows] if teacher else None
        for v0 in range(0, vocab, vocab_chunk):
            cols = slice(v0, min(v0 + vocab_chunk, vocab))
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            z, e = tiles.get(Z, *shape), tiles.get(E, *shape)
            z = _logits(h_s, student_weight[cols], inv_t, acc, s_head, _columns(student_bias, cols), out=z)
            zy[rows] += _target_logit(z, y, v0)
            update = _online_update(m_s[rows], s_s[rows], a_s[rows], z, tiles.get(SCRATCH, *shape), e)
            m_s[rows], s_s[rows], a_s[rows], scale_s = update
            if not teacher:
                continue
            u = _logits(
                h_t,
                teacher_weight[cols],
                inv_t,
                acc,
                t_head,
                _columns(teacher_bias, cols),
                out=tiles.get(SCRATCH, *shape),
            )
            uy[rows] += _target_logit(u, y, v0)
            if kind == DIV_REVERSE_KL:  # sum e^{z - m} (z - u) from the student's e, before the teacher's update
                cross[rows] = scale_s * cross[rows] + _row_dot_(z.sub_(u), e)
            update = _online_update(m_t[rows], s_t[rows], a_t[rows], u, tiles.get(TEACHER_SCRATCH, *shape), e)
            m_t[rows], s_t[rows], a_t[rows], scale_t = update
            if kind == DIV_FORWARD_KL:  # sum e^{u - m_u} (u - z)
                cross[rows] = scale_t * cross[rows] + _row_dot_(u.sub_(z), e)

    valid = targets != problem.ignore_index
    state = StreamState(m_s, s_s, a_s, zy, m_t=m_t, s_t=s_t, a_t=a_t, uy=uy, cross=cross)
    stats = finalize(valid, state, kind, shards=shards)
    if kind == DIV_REVERSE_KL:
        return stats, stats.divergence
    if kind != DIV_JSD:
        return stats, None

    # Generalized JSD: log M needs both final lse values, hence a second sweep. Its tiles are half
    # as tall: log p, log q, log M and the mixture's temporaries live together.
    beta = problem.jsd_beta
    kl_q_m = torch.zeros(n, dtype=acc, device=dev)
    kl_p_m = torch.zeros(n, dtype=acc, device=dev)
    for n0 in range(0, n, jsd_rows):
        rows = slice(n0, min(n0 + jsd_rows, n))
        for v0 in range(0, vocab, vocab_chunk):
            cols = slice(v0, min(v0 + vocab_chunk, vocab))
            log_p, log_q, log_m, diff = (tiles.get(i, rows.stop - rows.start, cols.stop - cols.start) for i in range(4))
            log_p = _logits(
                student_hidden[rows], student_weight[cols], inv_t, acc, s_head, _columns(student_bias, cols), out=log_p
            ).sub_(stats.student_lse[rows, None])
            log_q = _logits(
                teacher_hidden[rows], teacher_weight[cols], inv_t, acc, t_head, _columns(teacher_bias, cols), out=log_q
            ).sub_(stats.teacher_lse[rows, None])
            log_m = _jsd_log_mixture(log_p, log_q, beta, out=log_m, scratch=diff)
            # q (log q - log M), then p (log p - log M), in place
            kl_q_m[rows] += _row_dot_(torch.sub(log_q, log_m, out=diff), log_q.exp_())
            log_p_minus_log_m = log_m.neg_().add_(log_p)
            kl_p_m[rows] += _row_dot_(log_p_minus_log_m, log_p.exp_())
    return finish_jsd(stats, valid, torch.stack([kl_q_m, kl_p_m]), beta, shards)


def full_row_divergence(
    log_p: torch.Tensor, p: torch.Tensor, log_q: torch.Tensor, divergence: int, jsd_beta: float
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row divergence from whole rows of log-probabilities [rows, V] (student p = exp(log p),
    teacher q), and the per-row `div_aux` that `divergence_grad_terms` needs:

        reverse KL   KL(p||q) = sum p (log p - log q)                 aux = KL(p||q)
        forward KL   KL(q||p) = sum q (log q - log p)                 aux = None
        JSD_beta     beta KL(q||M) + (1 - beta) KL(p||M),
                     M = (1 - beta) p + beta q                        aux = KL(p||M)
    """
    if divergence == DIV_REVERSE_KL:
        kl = (p * (log_p - log_q)).sum(dim=1)
        return kl, kl
    if divergence == DIV_FORWARD_KL:
        return (log_q.exp() * (log_q - log_p)).sum(dim=1), None
    if divergence != DIV_JSD:
        raise ValueError(f"full_row_divergence needs a divergence, got {divergence}")
    log_m = _jsd_log_mixture(log_p, log_q, jsd_beta)
    kl_p_m = (p * (log_p - log_m)).sum(dim=1)
    kl_q_m = (log_q.exp() * (log_q - log_m)).sum(dim=1)
    return jsd_beta * kl_q_m + (1.0 - jsd_beta) * kl_p_m, kl_p_m


def divergence_grad_terms(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    div_aux: Optional[torch.Tensor],
    grad_divergence: torch.Tensor,
    divergence: int,
    jsd_beta: float,
    jsd_scratch: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The divergence's share of dL/dz as (coef, extra) with dL/dz = p * coef + extra, for the
    per-row upstream gradient g (before the 1/tau chain factor):

        reverse KL   coef = g (log p - log q - KL(p||q))                  extra = None
        forward KL   coef = g                                             extra = -g q
        JSD_beta     coef = g (1 - beta) (log p - log M - KL(p||M))       extra = None

    `coef` is [rows, V] or, for forward KL, [rows, 1]. `log_q` is consumed: reverse KL and
    forward KL overwrite it (with coef, and with -g q) to save a tile. `jsd_scratch`: two tiles
    of log p's shape for log M and its temporary (JSD only), else new ones.
    """
    g = grad_divergence[:, None]
    if divergence == DIV_REVERSE_KL:
        return torch.sub(log_p, log_q, out=log_q).sub_(div_aux[:, None]).mul_(g), None
    if divergence == DIV_FORWARD_KL:
        return g, log_q.exp_().mul_(-g)
    coef = (
        _jsd_log_mixture(log_p, log_q, jsd_beta, *(jsd_scratch or (None, None)))
        .neg_()
        .add_(log_p)
        .sub_(div_aux[:, None])
    )
    return coef.mul_(g * (1.0 - jsd_beta)), None


def grad_logits_tile(
    z: torch.Tensor,
    u: Optional[torch.Tensor],
    targets: torch.Tensor,
    v0: int,
    student_lse: torch.Tensor,
    student_entropy: torch.Tensor,
    teacher_lse: Optional[torch.Tensor],
    div_aux: Optional[torch.Tensor],
    grad_log_prob: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_divergence: Optional[torch.Tensor],
    divergence: int,
    jsd_beta: float,
    p_out: Optional[torch.Tensor] = None,
    jsd_scratch: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """dL/dz for one [rows, cols] tile of student logits (before the 1/tau chain factor).
    Tiles of z's shape may be passed for p (`p_out`) and JSD's log M (`jsd_scratch`), else new ones."""
    # z is a tile owned by the caller: reuse it in place (log p, then the coefficient, then dz).
    log_p = z.sub_(student_lse[:, None])
    p = torch.exp(log_p, out=p_out)
    # dz = p * (coef + div_coef) + extra, with div_coef / extra the divergence's share.
    div_coef, extra = None, None
    if divergence != DIV_NONE and grad_divergence is not None:
        div_coef, extra = divergence_grad_terms(
            log_p, u.sub_(teacher_lse[:, None]), div_aux, grad_divergence, divergence, jsd_beta, jsd_scratch
        )
    # Row-wise coefficient of p from the log-prob and entropy: -g_lp - g_H (log p + H).
    coef = log_p.add_(student_entropy[:, None]).mul_(-grad_entropy[:, None]).sub_(grad_log_prob[:, None])
    if div_coef is not None:
        coef.add_(div_coef)
    dz = coef.mul_(p)
    if extra is not None:
        dz.add_(extra)
    local = targets - v0
    in_tile = (local >= 0) & (local < z.shape[1])
    rows = torch.nonzero(in_tile).squeeze(1)
    dz[rows, local[rows]] += grad_log_prob[rows]
    return dz


def accumulate_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
    """out = a @ b for the first product into `out` (mm out=), out += a @ b after. A weight
    gradient [V, D] so built needs no zero-fill pass (1.5 GB at V = 152k, D = 2560, as much as a
    third of a product on the CPU); its owner zeroes it only if no product ever came."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def chunked_backward(
    problem: StatsProblem,
    inputs: BackwardInputs,
    *,
    need_hidden_grad: bool = True,
    need_weight_grad: bool = True,
    need_bias_grad: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Recompute tiles and accumulate (grad_student_hidden, grad_student_weight,
    grad_student_bias) in the accumulation dtype; the caller casts to the parameter dtype.
    Ignored rows must arrive with zero upstream gradients. On CUDA: `tile_fold`."""
    if tile_fold.enabled(inputs.student_hidden.device) and inputs.student_hidden.dtype != torch.float64:
        return tile_fold.fold_backward(
            problem,
            inputs,
            need_hidden_grad=need_hidden_grad,
            need_weight_grad=need_weight_grad,
            need_bias_grad=need_bias_grad,
        )
    student_hidden, student_weight, targets, teacher_hidden, teacher_weight = inputs[:5]
    student_lse, student_entropy, teacher_lse, div_aux = inputs[5:9]
    grad_log_prob, grad_entropy, grad_divergence, student_bias, teacher_bias = inputs[9:]
    token_chunk, vocab_chunk = DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK  # module constants: tests shrink them
    n, vocab = problem.num_tokens, problem.vocab_size
    acc = _acc_dtype(student_hidden)
    inv_t = problem.inv_temperature
    use_teacher = inputs.divergence_kind(problem) != DIV_NONE
    s_head, t_head = problem.student_head, problem.teacher_head
    grad_hidden = (
        torch.zeros(student_hidden.shape, dtype=acc, device=student_hidden.device) if need_hidden_grad else None
    )
    grad_bias = torch.zeros(vocab, dtype=acc, device=student_hidden.device) if need_bias_grad else None
    # dW is written (mm out=) by the first token chunk that has gradient and accumulated after:
    # no zero-fill pass over a V x D buffer (1.5 GB at V = 152k, D = 2560).
    grad_weight = (
        torch.empty(student_weight.shape, dtype=acc, device=student_weight.device) if need_weight_grad else None
    )
    weight_written = False
    row_has_grad = inputs.rows_with_gradient()
    if use_teacher and problem.divergence == DIV_JSD:
        token_chunk = max(1, token_chunk // 2)  # the JSD gradient holds ~6 tiles (log M and its temporaries)
    # z (then log p, then dz), p, u (then log q), and for JSD log M and its scratch
    slots = (5 if problem.divergence == DIV_JSD else 3) if use_teacher else 2
    tiles = TileBuffers(slots * min(token_chunk, n) * min(vocab_chunk, vocab), acc, student_hidden.device)

    for n0 in range(0, n, token_chunk):
        rows = slice(n0, min(n0 + token_chunk, n))
        if not bool(row_has_grad[rows].any()):
            continue  # every row masked or with zero upstream gradient: skip the recompute
        h_s = student_hidden[rows].to(acc)
        for v0 in range(0, vocab, vocab_chunk):
            cols = slice(v0, min(v0 + vocab_chunk, vocab))
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            w_c = student_weight[cols].to(acc)
            z = torch.mm(h_s, w_c.t(), out=tiles.get(0, *shape))
            z = apply_head_(z, s_head, _columns(student_bias, cols), inv_t)
            u = (
                _logits(
                    teacher_hidden[rows],
                    teacher_weight[cols],
                    inv_t,
                    acc,
                    t_head,
                    _columns(teacher_bias, cols),
                    out=tiles.get(2, *shape),
                )
                if use_teacher
                else None
            )
            jacobian = head_jacobian(z, s_head, inv_t)  # before grad_logits_tile reuses z
            dz = grad_logits_tile(
                z,
                u,
                targets[rows],
                v0,
                student_lse[rows],
                student_entropy[rows],
                teacher_lse[rows] if use_teacher else None,
                div_aux[rows] if div_aux is not None else None,
                grad_log_prob[rows],
                grad_entropy[rows],
                grad_divergence[rows] if use_teacher else None,
                problem.divergence,
                problem.jsd_beta,
                p_out=tiles.get(1, *shape),
                jsd_scratch=(tiles.get(3, *shape), tiles.get(4, *shape)) if slots == 5 else None,
            )
            dz = scale_by_jacobian_(dz, jacobian)  # dL/dr, r = h W^T + b
            if grad_bias is not None:
                grad_bias[cols] += dz.sum(dim=0)
            if grad_hidden is not None:
                grad_hidden[rows].addmm_(dz, w_c)
            if grad_weight is not None:
                accumulate_product(grad_weight[cols], dz.t(), h_s, first=not weight_written)
        weight_written = True
    if grad_weight is not None and not weight_written:
        grad_weight.zero_()  # no row carried gradient
    return grad_hidden, grad_weight, grad_bias
