"""The chunked backend's CUDA structure: cuBLAS products on bounded tiles, one Triton fold per tile.

TRL's and Liger's kernels run the vocabulary projection in cuBLAS and fold each tile with one
Triton kernel, so their products run at cuBLAS speed on any GPU with no tile tuning. This module
gives the `chunked` backend that structure (the torch ops of `chunked.py` remain the CPU path):

    forward   for each [token_chunk, vocab_chunk] tile: r = h W_c^T (and the teacher's) by cuBLAS
              into a reused fp32 buffer, then `_fold_stats_kernel` reads each tile once: the
              head (bias, scale, soft-cap, 1/tau), the target logit and the online softmax state
              (m, S, A, z_y, KL cross term) of every row, kept in a [9, N] fp32 buffer between
              tiles. Generalized JSD takes a second sweep (`_fold_jsd_kernel`).
    backward  per tile: r (and the teacher's) by cuBLAS, `_fold_grad_kernel` reads them once and
              writes dL/dr in the parameter dtype (the column sums go to db by atomics), then
              cuBLAS: dh[rows] += dr W_c, dW[c] (+)= dr^T h.

The math is that of `triton_token_stats` (derivations in csrc_notes/token_stats.md); the row
state and its finalization are shared (`_row_stats.finalize`). The cost model of this path
against the fused Triton kernels, and the rule `auto` follows, are in csrc_notes/tile_fold.md.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fire_kernels._validation import DIV_FORWARD_KL, DIV_JSD, DIV_NONE, DIV_REVERSE_KL, PLAIN_HEAD, StatsProblem
from fire_kernels.backends._row_stats import (
    F_A_S,
    F_A_T,
    F_CROSS,
    F_M_S,
    F_M_T,
    F_S_S,
    F_S_T,
    F_UY,
    F_ZY,
    NUM_FIELDS,
    BackwardInputs,
    StreamState,
    finalize,
    finish_jsd,
)
from fire_kernels.backends.triton_token_stats import (
    _apply_head,
    _fold_tile,
    _grad_tile,
    _head_args,
    _jsd_tile,
    _store_state,
    interpreter_active,
)

# Tiles: cuBLAS products of [TOKEN_CHUNK, VOCAB_CHUNK] (fp32 buffers: 2 x 64 MiB at most, with the
# teacher's); the fold kernels walk a tile in [FOLD_BLOCK_N, FOLD_BLOCK_V] blocks.
TOKEN_CHUNK = 2048
VOCAB_CHUNK = 8192
FOLD_BLOCK_N = 16
FOLD_BLOCK_V = 128
# warps per fold: the fewest with zero spills for every variant on sm_80 / sm_90 (compile_report)
FOLD_NUM_WARPS = {"stats": 8, "jsd": 4, "grad": 8}
# Tests set this to run the fold kernels on CPU tensors under TRITON_INTERPRET=1.
FORCE_ON_CPU = False


def enabled(device: torch.device) -> bool:
    """Whether the chunked backend folds its tiles with these kernels on `device`."""
    return device.type == "cuda" or (FORCE_ON_CPU and interpreter_active())


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_tile(TILE, rows, cols, row_mask, col_mask, stride):
    return tl.load(
        TILE + rows[:, None].to(tl.int64) * stride + cols[None, :],
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _load_logit_tiles(
    Z,
    U,
    S_BIAS,
    T_BIAS,
    offs_r,
    offs_c,
    row_mask,
    col_mask,
    tile_stride,
    col_start,
    inv_temp,
    s_scale,
    s_softcap,
    t_scale,
    t_softcap,
    WITH_TEACHER: tl.constexpr,
    S_HAS_BIAS: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    T_HAS_SOFTCAP: tl.constexpr,
):
    """One block of finished student logits z (and teacher logits u when WITH_TEACHER, else z)
    from the raw product tiles, their heads applied."""
    cols = col_start + offs_c
    z = _apply_head(
        _load_tile(Z, offs_r, offs_c, row_mask, col_mask, tile_stride),
        S_BIAS,
        cols,
        col_mask,
        inv_temp,
        s_scale,
        s_softcap,
        S_HAS_BIAS,
        S_HAS_SOFTCAP,
    )
    u = z
    if WITH_TEACHER:
        u = _apply_head(
            _load_tile(U, offs_r, offs_c, row_mask, col_mask, tile_stride),
            T_BIAS,
            cols,
            col_mask,
            inv_temp,
            t_scale,
            t_softcap,
            T_HAS_BIAS,
            T_HAS_SOFTCAP,
        )
    return z, u


@triton.jit
def _fold_stats_kernel(
    Z,
    U,
    S_BIAS,
    T_BIAS,
    TARGETS,
    STATE,
    R,
    C,
    N,
    row0,
    col_start,
    tile_stride,
    inv_temp,
    s_scale,
    s_softcap,
    t_scale,
    t_softcap,
    HAS_TEACHER: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    S_HAS_BIAS: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    T_HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Fold one [R, C] tile of raw products (columns col_start.., rows row0..) into the row state."""
    offs_r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_r < R
    state = STATE + row0 + offs_r
    y = tl.load(TARGETS + row0 + offs_r, mask=row_mask, other=-1).to(tl.int32) - col_start
    m_s = tl.load(state + 0 * N, mask=row_mask, other=-1.0e30)
    s_s = tl.load(state + 1 * N, mask=row_mask, other=0.0)
    a_s = tl.load(state + 2 * N, mask=row_mask, other=0.0)
    zy = tl.load(state + 3 * N, mask=row_mask, other=0.0)
    if HAS_TEACHER:
        m_t = tl.load(state + 4 * N, mask=row_mask, other=-1.0e30)
        s_t = tl.load(state + 5 * N, mask=row_mask, other=0.0)
        a_t = tl.load(state + 6 * N, mask=row_mask, other=0.0)
        uy = tl.load(state + 7 * N, mask=row_mask, other=0.0)
        cross = tl.load(state + 8 * N, mask=row_mask, other=0.0)
    else:  # the empty teacher state, as _store_state skips it (a mask `row_mask & HAS_TEACHER`
        # compiles the same, but Triton 3.2's interpreter cannot broadcast the constant)
        m_t = tl.full([BLOCK_N], -1.0e30, tl.float32)
        s_t = tl.zeros([BLOCK_N], tl.float32)
        a_t = s_t
        uy = s_t
        cross = s_t
    for c0 in range(0, C, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V)
        col_mask = offs_c < C
        z, u = _load_logit_tiles(
            Z,
            U,
            S_BIAS,
            T_BIAS,
            offs_r,
            offs_c,
            row_mask,
            col_mask,
            tile_stride,
            col_start,
            inv_temp,
            s_scale,
            s_softcap,
            t_scale,
            t_softcap,
            HAS_TEACHER,
            S_HAS_BIAS,
            S_HAS_SOFTCAP,
            T_HAS_BIAS,
            T_HAS_SOFTCAP,
        )
        m_s, s_s, a_s, zy, m_t, s_t, a_t, uy, cross = _fold_tile(
            z,
            u,
            offs_c[None, :] == y[:, None],
            col_mask,
            m_s,
            s_s,
            a_s,
            zy,
            m_t,
            s_t,
            a_t,
            uy,
            cross,
            HAS_TEACHER,
            DIVERGENCE,
        )
    _store_state(state, N, row_mask, m_s, s_s, a_s, zy, m_t, s_t, a_t, uy, cross, HAS_TEACHER, HAS_TEACHER)


@triton.jit
def _fold_jsd_kernel(
    Z,
    U,
    S_BIAS,
    T_BIAS,
    S_LSE,
    T_LSE,
    KL,
    R,
    C,
    N,
    row0,
    col_start,
    tile_stride,
    inv_temp,
    s_scale,
    s_softcap,
    t_scale,
    t_softcap,
    log_one_minus_beta,
    log_beta,
    S_HAS_BIAS: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    T_HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Second JSD sweep: add this tile's sum q (log q - log M) and sum p (log p - log M) to KL[0 / 1]."""
    offs_r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_r < R
    lse_s = tl.load(S_LSE + row0 + offs_r, mask=row_mask, other=0.0)
    lse_t = tl.load(T_LSE + row0 + offs_r, mask=row_mask, other=0.0)
    kl_q_m = tl.zeros((BLOCK_N,), tl.float32)
    kl_p_m = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, C, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V)
        col_mask = offs_c < C
        z, u = _load_logit_tiles(
            Z,
            U,
            S_BIAS,
            T_BIAS,
            offs_r,
            offs_c,
            row_mask,
            col_mask,
            tile_stride,
            col_start,
            inv_temp,
            s_scale,
            s_softcap,
            t_scale,
            t_softcap,
            True,
            S_HAS_BIAS,
            S_HAS_SOFTCAP,
            T_HAS_BIAS,
            T_HAS_SOFTCAP,
        )
        tile_p_m, tile_q_m = _jsd_tile(z, u, lse_s, lse_t, col_mask, log_one_minus_beta, log_beta)
        kl_p_m += tile_p_m
        kl_q_m += tile_q_m
    kl = KL + row0 + offs_r
    tl.store(kl, tl.load(kl, mask=row_mask, other=0.0) + kl_q_m, mask=row_mask)
    tl.store(kl + N, tl.load(kl + N, mask=row_mask, other=0.0) + kl_p_m, mask=row_mask)


@triton.jit
def _fold_grad_kernel(
    Z,
    U,
    DR,
    S_BIAS,
    T_BIAS,
    GRAD_BIAS,
    TARGETS,
    S_LSE,
    S_ENT,
    T_LSE,
    DIV_AUX,
    G_LOGPROB,
    G_ENTROPY,
    G_DIVERGENCE,
    R,
    C,
    row0,
    col_start,
    tile_stride,
    inv_temp,
    s_scale,
    s_softcap,
    t_scale,
    t_softcap,
    jsd_beta,
    log_one_minus_beta,
    log_beta,
    DIVERGENCE: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    S_HAS_BIAS: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    T_HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dL/dr for one tile (r = h W_c^T, before the head), written to DR in its dtype:
    dz = g_lp (onehot - p) - g_H p (log p + H) + g_D dDiv/dz, times the head's Jacobian."""
    offs_r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_r < R
    rows = row0 + offs_r
    g_lp = tl.load(G_LOGPROB + rows, mask=row_mask, other=0.0)
    g_ent = tl.load(G_ENTROPY + rows, mask=row_mask, other=0.0)
    y = tl.load(TARGETS + rows, mask=row_mask, other=-1).to(tl.int32) - col_start
    lse_s = tl.load(S_LSE + rows, mask=row_mask, other=0.0)
    ent_s = tl.load(S_ENT + rows, mask=row_mask, other=0.0)
    g_div = g_lp
    lse_t = lse_s
    aux = lse_s
    if DIVERGENCE != 0:
        g_div = tl.load(G_DIVERGENCE + rows, mask=row_mask, other=0.0)
        lse_t = tl.load(T_LSE + rows, mask=row_mask, other=0.0)
        aux = tl.load(DIV_AUX + rows, mask=row_mask, other=0.0)
    for c0 in range(0, C, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V)
        col_mask = offs_c < C
        z, u = _load_logit_tiles(
            Z,
            U,
            S_BIAS,
            T_BIAS,
            offs_r,
            offs_c,
            row_mask,
            col_mask,
            tile_stride,
            col_start,
            inv_temp,
            s_scale,
            s_softcap,
            t_scale,
            t_softcap,
            DIVERGENCE != 0,
            S_HAS_BIAS,
            S_HAS_SOFTCAP,
            T_HAS_BIAS,
            T_HAS_SOFTCAP,
        )
        dr = _grad_tile(
            z,
            u,
            y,
            offs_c,
            row_mask,
            col_mask,
            lse_s,
            ent_s,
            lse_t,
            aux,
            g_lp,
            g_ent,
            g_div,
            inv_temp,
            s_scale,
            s_softcap,
            jsd_beta,
            log_one_minus_beta,
            log_beta,
            DIVERGENCE,
            S_HAS_SOFTCAP,
        )
        tl.store(
            DR + offs_r[:, None].to(tl.int64) * tile_stride + offs_c[None, :],
            dr.to(DR.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )
        if COMPUTE_DB:
            tl.atomic_add(GRAD_BIAS + col_start + offs_c, tl.sum(dr, 0), mask=col_mask, sem="relaxed")


# ----------------------------------------------------------------------------- host side


def _mm_into(out: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b_t with fp32 accumulation and output: cuBLAS's fp32-output GEMM for half
    inputs (torch >= 2.8), an upcast elsewhere."""
    if a.dtype in (torch.float16, torch.bfloat16) and a.device.type == "cuda":
        try:
            if accumulate:
                torch.addmm(out, a, b_t, out_dtype=torch.float32, out=out)
            else:
                torch.mm(a, b_t, out_dtype=torch.float32, out=out)
            return
        except TypeError:  # torch < 2.8: no out_dtype
            pass
    a, b_t = a.to(out.dtype), b_t.to(out.dtype)
    if accumulate:
        out.addmm_(a, b_t)
    else:
        torch.mm(a, b_t, out=out)


def _launch_args(problem: StatsProblem, student_bias, teacher_bias, dummy, with_teacher: bool):
    (s_bias, s_scale, s_cap), (s_has_bias, s_has_cap) = _head_args(problem.student_head, student_bias, dummy)
    (t_bias, t_scale, t_cap), (t_has_bias, t_has_cap) = _head_args(
        problem.teacher_head if with_teacher else PLAIN_HEAD, teacher_bias if with_teacher else None, dummy
    )
    return (
        (s_bias, t_bias),
        (s_scale, s_cap, t_scale, t_cap),
        dict(S_HAS_BIAS=s_has_bias, S_HAS_SOFTCAP=s_has_cap, T_HAS_BIAS=t_has_bias, T_HAS_SOFTCAP=t_has_cap),
    )


def _tiles(n: int, vocab: int):
    for n0 in range(0, n, TOKEN_CHUNK):
        for v0 in range(0, vocab, VOCAB_CHUNK):
            yield slice(n0, min(n0 + TOKEN_CHUNK, n)), slice(v0, min(v0 + VOCAB_CHUNK, vocab))


def fold_forward(
    problem: StatsProblem,
    student_hidden,
    student_weight,
    targets,
    teacher_hidden=None,
    teacher_weight=None,
    *,
    student_bias=None,
    teacher_bias=None,
    shards=None,
):
    """`chunked.chunked_forward` on cuBLAS tiles with Triton folds. Returns (RowStats, div_aux)."""
    n, vocab = problem.num_tokens, problem.vocab_size
    dev = student_hidden.device
    teacher = problem.has_teacher
    kind = problem.divergence
    state = torch.zeros((NUM_FIELDS, n), dtype=torch.float32, device=dev)
    state[F_M_S].fill_(-1.0e30)
    state[F_M_T].fill_(-1.0e30)
    targets = targets.contiguous()
    z_buf = torch.empty((min(n, TOKEN_CHUNK), min(vocab, VOCAB_CHUNK)), dtype=torch.float32, device=dev)
    u_buf = torch.empty_like(z_buf) if teacher else z_buf
    biases, head_values, head_flags = _launch_args(problem, student_bias, teacher_bias, state, teacher)
    fwd_kind = kind if kind in (DIV_REVERSE_KL, DIV_FORWARD_KL) else DIV_NONE
    for rows, cols in _tiles(n, vocab):
        r, c = rows.stop - rows.start, cols.stop - cols.start
        z, u = z_buf[:r, :c], u_buf[:r, :c]
        _mm_into(z, student_hidden[rows], student_weight[cols].t())
        if teacher:
            _mm_into(u, teacher_hidden[rows], teacher_weight[cols].t())
        _fold_stats_kernel[(triton.cdiv(r, FOLD_BLOCK_N),)](
            z,
            u,
            *biases,
            targets,
            state,
            r,
            c,
            n,
            rows.start,
            cols.start,
            z.stride(0),
            problem.inv_temperature,
            *head_values,
            HAS_TEACHER=teacher,
            DIVERGENCE=fwd_kind,
            **head_flags,
            BLOCK_N=FOLD_BLOCK_N,
            BLOCK_V=FOLD_BLOCK_V,
            num_warps=FOLD_NUM_WARPS["stats"],
        )
    valid = targets != problem.ignore_index
    student = (state[F_M_S], state[F_S_S], state[F_A_S], state[F_ZY])
    if teacher:
        stream = StreamState(
            *student, m_t=state[F_M_T], s_t=state[F_S_T], a_t=state[F_A_T], uy=state[F_UY], cross=state[F_CROSS]
        )
        stats = finalize(valid, stream, kind, shards=shards)
    else:
        stats = finalize(valid, StreamState(*student), shards=shards)
    if kind == DIV_REVERSE_KL:
        return stats, stats.divergence
    if kind != DIV_JSD:
        return stats, None
    beta = problem.jsd_beta
    kl = torch.zeros((2, n), dtype=torch.float32, device=dev)
    s_lse, t_lse = stats.student_lse.contiguous(), stats.teacher_lse.contiguous()
    for rows, cols in _tiles(n, vocab):
        r, c = rows.stop - rows.start, cols.stop - cols.start
        z, u = z_buf[:r, :c], u_buf[:r, :c]
        _mm_into(z, student_hidden[rows], student_weight[cols].t())
        _mm_into(u, teacher_hidden[rows], teacher_weight[cols].t())
        _fold_jsd_kernel[(triton.cdiv(r, FOLD_BLOCK_N),)](
            z,
            u,
            *biases,
            s_lse,
            t_lse,
            kl,
            r,
            c,
            n,
            rows.start,
            cols.start,
            z.stride(0),
            problem.inv_temperature,
            *head_values,
            math.log(1.0 - beta),
            math.log(beta),
            **head_flags,
            BLOCK_N=FOLD_BLOCK_N,
            BLOCK_V=FOLD_BLOCK_V,
            num_warps=FOLD_NUM_WARPS["jsd"],
        )
    return finish_jsd(stats, valid, kl, beta, shards)


def fold_backward(
    problem: StatsProblem,
    inputs: BackwardInputs,
    *,
    need_hidden_grad=True,
    need_weight_grad=True,
    need_bias_grad=False,
):
    """`chunked.chunked_backward` on cuBLAS tiles with a Triton fold: fp32 (dh, dW, db)."""
    student_hidden, student_weight, targets, teacher_hidden, teacher_weight = inputs[:5]
    student_lse, student_entropy, teacher_lse, div_aux = inputs[5:9]
    grad_log_prob, grad_entropy, grad_divergence, student_bias, teacher_bias = inputs[9:]
    n, vocab = problem.num_tokens, problem.vocab_size
    dev = student_hidden.device
    kind = inputs.divergence_kind(problem)
    use_teacher = kind != DIV_NONE
    grad_hidden = torch.zeros(student_hidden.shape, dtype=torch.float32, device=dev) if need_hidden_grad else None
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=dev) if need_weight_grad else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_bias_grad else None
    if n == 0:
        return grad_hidden, grad_weight, grad_bias
    row_has_grad = inputs.rows_with_gradient()
    z_buf = torch.empty((min(n, TOKEN_CHUNK), min(vocab, VOCAB_CHUNK)), dtype=torch.float32, device=dev)
    u_buf = torch.empty_like(z_buf) if use_teacher else z_buf
    # dL/dr in the parameter dtype for the tensor-core products (fp32: in place over z)
    dr_buf = z_buf if student_weight.dtype == torch.float32 else torch.empty_like(z_buf, dtype=student_weight.dtype)
    biases, head_values, head_flags = _launch_args(problem, student_bias, teacher_bias, z_buf, use_teacher)
    dummy = student_lse
    beta = problem.jsd_beta
    for rows, cols in _tiles(n, vocab):
        if not bool(row_has_grad[rows].any()):
            continue
        r, c = rows.stop - rows.start, cols.stop - cols.start
        z, u, dr = z_buf[:r, :c], u_buf[:r, :c], dr_buf[:r, :c]
        h_s = student_hidden[rows]
        _mm_into(z, h_s, student_weight[cols].t())
        if use_teacher:
            _mm_into(u, teacher_hidden[rows], teacher_weight[cols].t())
        _fold_grad_kernel[(triton.cdiv(r, FOLD_BLOCK_N),)](
            z,
            u,
            dr,
            *biases,
            grad_bias if grad_bias is not None else dummy,
            targets.contiguous(),
            student_lse.contiguous(),
            student_entropy.contiguous(),
            teacher_lse.contiguous() if use_teacher else dummy,
            div_aux.contiguous() if (use_teacher and div_aux is not None) else dummy,
            grad_log_prob.contiguous(),
            grad_entropy.contiguous(),
            grad_divergence.contiguous() if use_teacher else dummy,
            r,
            c,
            rows.start,
            cols.start,
            z.stride(0),
            problem.inv_temperature,
            *head_values,
            beta,
            math.log(1.0 - beta) if 0.0 < beta < 1.0 else 0.0,
            math.log(beta) if 0.0 < beta < 1.0 else 0.0,
            DIVERGENCE=kind,
            COMPUTE_DB=need_bias_grad,
            **head_flags,
            BLOCK_N=FOLD_BLOCK_N,
            BLOCK_V=FOLD_BLOCK_V,
            num_warps=FOLD_NUM_WARPS["grad"],
        )
        if grad_hidden is not None:
            _mm_into(grad_hidden[rows], dr, student_weight[cols], accumulate=True)
        if grad_weight is not None:
            _mm_into(grad_weight[cols], dr.t(), h_s, accumulate=True)
    return grad_hidden, grad_weight, grad_bias
