"""Triton backend: teacher-student token statistics with logit tiles that never leave the chip.

Kernels (math in `_row_stats.py` and `chunked.py`; derivations in csrc_notes/token_stats.md):

    _token_stats_fwd_kernel   grid (row blocks, vocab splits). Each program sweeps its share of
                              the vocab tiles, computing z = h W^T / tau (and u = g U^T / tau)
                              tile by tile with an fp32 accumulator, and keeps the online
                              softmax state (m, S, A, z_y, KL cross term) in registers. One
                              state per split goes to an O(splits * N) workspace; the host
                              merges splits (`_row_stats.merge_splits`).
    _jsd_fwd_kernel           second sweep for generalized JSD, which needs both final lse.
    _token_stats_bwd_kernel   grid (row blocks, vocab blocks), one recompute per tile: form
                              dL/dz in registers and atomically add dz @ W into dh and
                              dz^T @ h into dW (fp32 buffers), as Cut Cross-Entropy does.

Memory beyond inputs and gradients: the forward workspace (9 * splits * N floats), the fp32
gradient accumulators (N * D and V * D; they *are* the gradients for fp32 parameters) and
nothing of size N * V or chunk * V.

Half precision under the CPU interpreter: Triton 3.9's interpreter returns garbage from
`tl.dot` on bf16 operands (fp16 and fp32 are right). With DOT_FP32 the kernels upcast both
dot operands to fp32 first (dz after rounding it to bf16, as the GPU path does).
Products of bf16 values are exact in fp32 and the GPU tensor-core
path accumulates in fp32 too, so the upcast path computes the same sums; the host sets the
flag only for bf16 under TRITON_INTERPRET=1. The compiled kernels (compile_report) use the
native bf16 dot.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from fire_kernels._validation import (
    DIV_FORWARD_KL,
    DIV_JSD,
    DIV_NONE,
    DIV_REVERSE_KL,
    PLAIN_HEAD,
    HeadSpec,
    StatsProblem,
)
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
    RowStats,
    StreamState,
    finalize,
    finish_jsd,
    merge_splits,
)
from fire_kernels.vocab_parallel import VocabShards


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TritonTileConfig:
    """Tile sizes and launch options. Any V and D work: tiles are masked at the edges.

    The defaults are the largest tiles from a sweep (csrc_notes/token_stats.md) that compile
    with zero spills for every kernel variant and dtype on both sm_80 and sm_90 under Triton
    3.9; other releases spill in a few variants (`benchmarks/compile_matrix.py`)."""

    block_n: int = 64
    block_v: int = 64
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 2
    jsd_num_warps: int = 8  # the JSD second sweep
    bwd_block_n: int = 64
    bwd_block_v: int = 64
    bwd_block_d: int = 32
    bwd_num_warps: int = 8


# fp32 operands (exact "ieee" products on the FMA path) need twice the registers per element.
FP32_CONFIG = TritonTileConfig(block_d=16, num_stages=1, jsd_num_warps=4)


def triton_release(version: str) -> tuple[int, int]:
    """(major, minor) of a Triton version such as "3.9.0" or "3.2.0+git1234"; (0, 0), the oldest,
    for a string that names none."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


# An fp32 backward with a head (bias or soft-cap on either model) keeps the head's logits, tanh
# and Jacobian live beside the gradient tile: with a 32-wide D tile every Triton from 3.0 to 3.8
# (the releases torch 2.4-2.14 pin) spills 184-416 bytes for every divergence, and 16 spills none;
# 3.9 fits 32 with no spill and spills 16 bytes with 16 (benchmarks/compile_matrix.py,
# csrc_notes/token_stats.md).
FP32_HEAD_CONFIG = replace(FP32_CONFIG, bwd_block_d=32 if triton_release(triton.__version__) >= (3, 9) else 16)


def default_config(dtype: torch.dtype, head: bool = False) -> TritonTileConfig:
    """The zero-spill configuration for a parameter dtype, and whether either model's head has a
    bias or a soft-cap (see compile_report)."""
    if interpreter_active():
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return FP32_HEAD_CONFIG if head else FP32_CONFIG
    return TritonTileConfig()


# Small tiles keep interpreted tests fast; they are also valid GPU tiles (dot needs >= 16).
INTERPRETER_CONFIG = TritonTileConfig(
    block_n=16, block_v=32, block_d=16, bwd_block_n=16, bwd_block_v=32, bwd_block_d=16
)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tanh(x):
    # sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]: never overflows, no libdevice call.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(
    HIDDEN,
    WEIGHT,
    BIAS,
    row_start,
    col_start,
    N,
    V,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    inv_temp,
    logit_scale,
    softcap,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """z[BLOCK_N, BLOCK_V] = softcap tanh(((HIDDEN[rows] @ WEIGHT[cols]^T + BIAS[cols]) * scale) / softcap)
    * inv_temp, fp32 accumulation (plain heads compile to r * inv_temp).

    Addresses are a 64-bit scalar base (int64 row offset: N*D and V*D may pass 2^31) plus
    int32 in-tile offsets recomputed each step, so no [BLOCK, BLOCK_D] pointer tensor is
    carried across the loop (that alone cost ~100 registers per thread)."""
    offs_r = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (row_start + offs_r) < N
    col_mask = (col_start + offs_c) < V
    h_base = HIDDEN + row_start.to(tl.int64) * stride_hn
    w_base = WEIGHT + col_start.to(tl.int64) * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        h = tl.load(
            h_base + offs_r[:, None] * stride_hn + d[None, :] * stride_hd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # W^T tile loaded as [BLOCK_D, BLOCK_V] (the usual K x N operand), no in-register transpose.
        w_t = tl.load(
            w_base + offs_c[None, :] * stride_wv + d[:, None] * stride_wd,
            mask=col_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        if DOT_FP32:
            h = h.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(h, w_t, acc, input_precision=INPUT_PRECISION)
    return _apply_head(acc, BIAS, col_start + offs_c, col_mask, inv_temp, logit_scale, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _apply_head(
    r, BIAS, cols, col_mask, inv_temp, logit_scale, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr
):
    """z = softcap tanh(((r + BIAS[cols]) * scale) / softcap) * inv_temp for a [rows, cols] tile of
    raw products r = h W^T (plain heads: r * inv_temp); `cols` are vocabulary ids."""
    if HAS_BIAS:
        r += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        return _tanh(r * (logit_scale / softcap)) * (softcap * inv_temp)
    return r * (logit_scale * inv_temp)


@triton.jit
def _online_softmax_tile(z, col_mask, m, s, a):
    """Fold one tile into the streaming state. A is the shifted moment sum e^{z-m} (z-m):
    when m -> m', A' = e^{m-m'} (A + (m-m') S) + sum_tile e^{z-m'} (z-m')."""
    m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], z, float("-inf")), 1))
    scale = tl.exp(m - m_new)
    shifted = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
    e = tl.where(col_mask[None, :], tl.exp(shifted), 0.0)
    a = scale * (a + (m - m_new) * s) + tl.sum(e * shifted, 1)
    s = scale * s + tl.sum(e, 1)
    return m_new, s, a, e, scale


@triton.jit
def _log_mixture(log_p, log_q, log_one_minus_beta, log_beta):
    """log M = log((1 - beta) p + beta q), a stable logaddexp."""
    x = log_p + log_one_minus_beta
    y = log_q + log_beta
    hi = tl.maximum(x, y)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi))


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fold_tile(
    z,
    u,
    is_target,
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
    HAS_TEACHER: tl.constexpr,
    DIVERGENCE: tl.constexpr,
):
    """Fold one tile of finished student (and teacher) logits into the row state: target logit,
    online softmax state, and the KL cross term of the divergence (see csrc_notes)."""
    zy += tl.sum(tl.where(is_target, z, 0.0), 1)
    m_s, s_s, a_s, e_s, scale_s = _online_softmax_tile(z, col_mask, m_s, s_s, a_s)
    if HAS_TEACHER:
        uy += tl.sum(tl.where(is_target, u, 0.0), 1)
        m_t, s_t, a_t, e_t, scale_t = _online_softmax_tile(u, col_mask, m_t, s_t, a_t)
        if DIVERGENCE == 1:  # reverse KL cross term: sum e^{z-m} (z - u)
            cross = scale_s * cross + tl.sum(e_s * (z - u), 1)
        if DIVERGENCE == 2:  # forward KL cross term: sum e^{u-m_u} (u - z)
            cross = scale_t * cross + tl.sum(e_t * (u - z), 1)
    return m_s, s_s, a_s, zy, m_t, s_t, a_t, uy, cross


@triton.jit
def _store_state(
    base, N, row_mask, m_s, s_s, a_s, zy, m_t, s_t, a_t, uy, cross, HAS_TEACHER: tl.constexpr, STORE_CROSS: tl.constexpr
):
    """Write the row state as fields [9, N] from `base` (the layout of `_row_stats`)."""
    tl.store(base + 0 * N, m_s, mask=row_mask)
    tl.store(base + 1 * N, s_s, mask=row_mask)
    tl.store(base + 2 * N, a_s, mask=row_mask)
    tl.store(base + 3 * N, zy, mask=row_mask)
    if HAS_TEACHER:
        tl.store(base + 4 * N, m_t, mask=row_mask)
        tl.store(base + 5 * N, s_t, mask=row_mask)
        tl.store(base + 6 * N, a_t, mask=row_mask)
        tl.store(base + 7 * N, uy, mask=row_mask)
        if STORE_CROSS:
            tl.store(base + 8 * N, cross, mask=row_mask)


@triton.jit
def _token_stats_fwd_kernel(
    S_HIDDEN,
    S_WEIGHT,
    S_BIAS,
    T_HIDDEN,
    T_WEIGHT,
    T_BIAS,
    TARGETS,
    PARTIALS,
    N,
    V,
    D_S,
    D_T,
    s_stride_hn,
    s_stride_hd,
    s_stride_wv,
    s_stride_wd,
    t_stride_hn,
    t_stride_hd,
    t_stride_wv,
    t_stride_wd,
    inv_temp,
    tiles_per_split,
    s_scale,
    s_softcap,
    t_scale,
    t_softcap,
    HAS_TEACHER: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    S_HAS_BIAS: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    T_HAS_SOFTCAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row_start = pid_n * BLOCK_N
    rows = row_start + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # int32 targets (V < 2^31): an int64 [BLOCK_N, BLOCK_V] comparison would pin registers.
    y = tl.load(TARGETS + rows, mask=row_mask, other=-1).to(tl.int32)

    # Running maxima start at a finite "-inf" so that (m - m_new) * S stays 0 * finite.
    m_s = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    s_s = tl.zeros((BLOCK_N,), tl.float32)
    a_s = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    m_t = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    s_t = tl.zeros((BLOCK_N,), tl.float32)
    a_t = tl.zeros((BLOCK_N,), tl.float32)
    uy = tl.zeros((BLOCK_N,), tl.float32)
    cross = tl.zeros((BLOCK_N,), tl.float32)

    num_tiles = tl.cdiv(V, BLOCK_V)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
    for tile in range(tile_begin, tile_end):
        col_start = tile * BLOCK_V
        col_mask = (col_start + tl.arange(0, BLOCK_V)) < V
        is_target = tl.arange(0, BLOCK_V)[None, :] == (y - col_start)[:, None]
        z = _logits_tile(
            S_HIDDEN,
            S_WEIGHT,
            S_BIAS,
            row_start,
            col_start,
            N,
            V,
            D_S,
            s_stride_hn,
            s_stride_hd,
            s_stride_wv,
            s_stride_wd,
            inv_temp,
            s_scale,
            s_softcap,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            DOT_FP32,
            INPUT_PRECISION,
            S_HAS_BIAS,
            S_HAS_SOFTCAP,
        )
        u = z
        if HAS_TEACHER:
            u = _logits_tile(
                T_HIDDEN,
                T_WEIGHT,
                T_BIAS,
                row_start,
                col_start,
                N,
                V,
                D_T,
                t_stride_hn,
                t_stride_hd,
                t_stride_wv,
                t_stride_wd,
                inv_temp,
                t_scale,
                t_softcap,
                BLOCK_N,
                BLOCK_V,
                BLOCK_D,
                DOT_FP32,
                INPUT_PRECISION,
                T_HAS_BIAS,
                T_HAS_SOFTCAP,
            )
        m_s, s_s, a_s, zy, m_t, s_t, a_t, uy, cross = _fold_tile(
            z, u, is_target, col_mask, m_s, s_s, a_s, zy, m_t, s_t, a_t, uy, cross, HAS_TEACHER, DIVERGENCE
        )

    _store_state(
        PARTIALS + split.to(tl.int64) * 9 * N + rows,
        N,
        row_mask,
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
        DIVERGENCE == 1 or DIVERGENCE == 2,
    )


@triton.jit
def _jsd_tile(z, u, lse_s, lse_t, col_mask, log_one_minus_beta, log_beta):
    """One tile's share of KL(p || M) and KL(q || M), M = (1 - beta) p + beta q: per-row sums of
    p (log p - log M) and q (log q - log M)."""
    log_p = z - lse_s[:, None]
    log_q = u - lse_t[:, None]
    log_m = _log_mixture(log_p, log_q, log_one_minus_beta, log_beta)
    p = tl.where(col_mask[None, :], tl.exp(log_p), 0.0)
    q = tl.where(col_mask[None, :], tl.exp(log_q), 0.0)
    return tl.sum(p * (log_p - log_m), 1), tl.sum(q * (log_q - log_m), 1)


@triton.jit
def _jsd_fwd_kernel(
    S_HIDDEN,
    S_WEIGHT,
    S_BIAS,
    T_HIDDEN,
    T_WEIGHT,
    T_BIAS,
    S_LSE,
    T_LSE,
    PARTIALS,
    N,
    V,
    D_S,
    D_T,
    s_stride_hn,
    s_stride_hd,
    s_stride_wv,
    s_stride_wd,
    t_stride_hn,
    t_stride_hd,
    t_stride_wv,
    t_stride_wd,
    inv_temp,
    tiles_per_split,
    log_one_minus_beta,
    log_beta,
    s_scale,
    s_softcap,
    t_scale,
    t_softcap,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    S_HAS_BIAS: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    T_HAS_SOFTCAP: tl.constexpr,
):
    """Per split: KL(q || M) and KL(p || M) partial sums, M = (1 - beta) p + beta q."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row_start = pid_n * BLOCK_N
    rows = row_start + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lse_s = tl.load(S_LSE + rows, mask=row_mask, other=0.0)
    lse_t = tl.load(T_LSE + rows, mask=row_mask, other=0.0)
    kl_q_m = tl.zeros((BLOCK_N,), tl.float32)
    kl_p_m = tl.zeros((BLOCK_N,), tl.float32)
    num_tiles = tl.cdiv(V, BLOCK_V)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
    for tile in range(tile_begin, tile_end):
        col_start = tile * BLOCK_V
        col_mask = (col_start + tl.arange(0, BLOCK_V)) < V
        z = _logits_tile(
            S_HIDDEN,
            S_WEIGHT,
            S_BIAS,
            row_start,
            col_start,
            N,
            V,
            D_S,
            s_stride_hn,
            s_stride_hd,
            s_stride_wv,
            s_stride_wd,
            inv_temp,
            s_scale,
            s_softcap,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            DOT_FP32,
            INPUT_PRECISION,
            S_HAS_BIAS,
            S_HAS_SOFTCAP,
        )
        u = _logits_tile(
            T_HIDDEN,
            T_WEIGHT,
            T_BIAS,
            row_start,
            col_start,
            N,
            V,
            D_T,
            t_stride_hn,
            t_stride_hd,
            t_stride_wv,
            t_stride_wd,
            inv_temp,
            t_scale,
            t_softcap,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            DOT_FP32,
            INPUT_PRECISION,
            T_HAS_BIAS,
            T_HAS_SOFTCAP,
        )
        tile_p_m, tile_q_m = _jsd_tile(z, u, lse_s, lse_t, col_mask, log_one_minus_beta, log_beta)
        kl_p_m += tile_p_m
        kl_q_m += tile_q_m
    base = PARTIALS + split.to(tl.int64) * 2 * N + rows
    tl.store(base, kl_q_m, mask=row_mask)
    tl.store(base + N, kl_p_m, mask=row_mask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _grad_tile(
    z,
    u,
    y_local,
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
    DIVERGENCE: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr,
):
    """dL/dr of one tile of finished student logits z (teacher u): dz = g_lp (onehot - p)
    - g_H p (log p + H) + g_D dDiv/dz, times the head's Jacobian dz/dr; 0 off the tile."""
    log_p = z - lse_s[:, None]
    p = tl.where(col_mask[None, :], tl.exp(log_p), 0.0)
    coef = -(g_lp[:, None] + g_ent[:, None] * (log_p + ent_s[:, None]))
    extra = tl.where(offs_c[None, :] == y_local[:, None], g_lp[:, None], 0.0)
    if DIVERGENCE != 0:
        log_q = u - lse_t[:, None]
        if DIVERGENCE == 1:  # d KL(p||q) = p (log p - log q - KL)
            coef += g_div[:, None] * (log_p - log_q - aux[:, None])
        if DIVERGENCE == 2:  # d KL(q||p) = p - q
            coef += g_div[:, None]
            extra -= g_div[:, None] * tl.where(col_mask[None, :], tl.exp(log_q), 0.0)
        if DIVERGENCE == 3:  # d JSD = (1 - beta) p (log p - log M - KL(p||M))
            log_m = _log_mixture(log_p, log_q, log_one_minus_beta, log_beta)
            coef += g_div[:, None] * (1.0 - jsd_beta) * (log_p - log_m - aux[:, None])
    jacobian = s_scale * inv_temp
    if S_HAS_SOFTCAP:
        t = z * (1.0 / (s_softcap * inv_temp))
        jacobian = (1.0 - t * t) * jacobian
    return tl.where(row_mask[:, None] & col_mask[None, :], (p * coef + extra) * jacobian, 0.0)


@triton.jit
def _token_stats_bwd_kernel(
    S_HIDDEN,
    S_WEIGHT,
    S_BIAS,
    T_HIDDEN,
    T_WEIGHT,
    T_BIAS,
    TARGETS,
    S_LSE,
    S_ENT,
    T_LSE,
    DIV_AUX,
    G_LOGPROB,
    G_ENTROPY,
    G_DIVERGENCE,
    GRAD_HIDDEN,
    GRAD_WEIGHT,
    GRAD_BIAS,
    N,
    V,
    D_S,
    D_T,
    s_stride_hn,
    s_stride_hd,
    s_stride_wv,
    s_stride_wd,
    t_stride_hn,
    t_stride_hd,
    t_stride_wv,
    t_stride_wd,
    inv_temp,
    jsd_beta,
    log_one_minus_beta,
    log_beta,
    s_scale,
    s_softcap,
    t_scale,
    t_softcap,
    DIVERGENCE: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    S_HAS_BIAS: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    T_HAS_SOFTCAP: tl.constexpr,
):
    """dz = g_lp (onehot - p) - g_H p (log p + H) + g_D dDiv/dz; dr = dz dz/dr (the head's
    Jacobian: scale / tau, times 1 - t^2 under a soft-cap, t = z tau / softcap); then
    dh[rows] += dr @ W[cols], dW[cols] += dr^T @ h[rows] and db[cols] += sum_rows dr by fp32 atomics."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    row_start = pid_n * BLOCK_N
    col_start = pid_v * BLOCK_V
    offs_r = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_V)
    rows = row_start + offs_r
    row_mask = rows < N
    g_lp = tl.load(G_LOGPROB + rows, mask=row_mask, other=0.0)
    g_ent = tl.load(G_ENTROPY + rows, mask=row_mask, other=0.0)
    g_div = tl.zeros((BLOCK_N,), tl.float32)
    if DIVERGENCE != 0:
        g_div = tl.load(G_DIVERGENCE + rows, mask=row_mask, other=0.0)
    # Tiles whose rows all carry zero upstream gradient (ignored / masked tokens) do no work.
    if tl.max(tl.abs(g_lp) + tl.abs(g_ent) + tl.abs(g_div), 0) > 0:
        col_mask = (col_start + offs_c) < V
        y_local = tl.load(TARGETS + rows, mask=row_mask, other=-1).to(tl.int32) - col_start
        lse_s = tl.load(S_LSE + rows, mask=row_mask, other=0.0)
        ent_s = tl.load(S_ENT + rows, mask=row_mask, other=0.0)
        z = _logits_tile(
            S_HIDDEN,
            S_WEIGHT,
            S_BIAS,
            row_start,
            col_start,
            N,
            V,
            D_S,
            s_stride_hn,
            s_stride_hd,
            s_stride_wv,
            s_stride_wd,
            inv_temp,
            s_scale,
            s_softcap,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            DOT_FP32,
            INPUT_PRECISION,
            S_HAS_BIAS,
            S_HAS_SOFTCAP,
        )
        u = z
        lse_t = lse_s
        aux = lse_s
        if DIVERGENCE != 0:
            lse_t = tl.load(T_LSE + rows, mask=row_mask, other=0.0)
            aux = tl.load(DIV_AUX + rows, mask=row_mask, other=0.0)
            u = _logits_tile(
                T_HIDDEN,
                T_WEIGHT,
                T_BIAS,
                row_start,
                col_start,
                N,
                V,
                D_T,
                t_stride_hn,
                t_stride_hd,
                t_stride_wv,
                t_stride_wd,
                inv_temp,
                t_scale,
                t_softcap,
                BLOCK_N,
                BLOCK_V,
                BLOCK_D,
                DOT_FP32,
                INPUT_PRECISION,
                T_HAS_BIAS,
                T_HAS_SOFTCAP,
            )
        dz = _grad_tile(
            z,
            u,
            y_local,
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
        if COMPUTE_DB:
            tl.atomic_add(GRAD_BIAS + col_start + offs_c, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        # Tensor-core operands in the parameter dtype (fp32 accumulation), as in CCE. Under the
        # interpreter's bf16 workaround dz is still rounded to bf16 first, then upcast: bf16
        # products are exact in fp32, so the interpreted sums equal the GPU's.
        dz_op = dz.to(S_WEIGHT.dtype.element_ty)
        if DOT_FP32:
            dz_op = dz_op.to(tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        if COMPUTE_DH:
            w_base = S_WEIGHT + col_start.to(tl.int64) * s_stride_wv
            gh_base = GRAD_HIDDEN + row_start.to(tl.int64) * D_S
            for d0 in range(0, D_S, BLOCK_D):
                d = d0 + offs_d
                d_mask = d < D_S
                w = tl.load(
                    w_base + offs_c[:, None] * s_stride_wv + d[None, :] * s_stride_wd,
                    mask=col_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    w = w.to(tl.float32)
                gh = tl.dot(dz_op, w, input_precision=INPUT_PRECISION)
                tl.atomic_add(
                    gh_base + offs_r[:, None] * D_S + d[None, :],
                    gh,
                    mask=row_mask[:, None] & d_mask[None, :],
                    sem="relaxed",
                )
        if COMPUTE_DW:
            h_base = S_HIDDEN + row_start.to(tl.int64) * s_stride_hn
            gw_base = GRAD_WEIGHT + col_start.to(tl.int64) * D_S
            for d0 in range(0, D_S, BLOCK_D):
                d = d0 + offs_d
                d_mask = d < D_S
                h = tl.load(
                    h_base + offs_r[:, None] * s_stride_hn + d[None, :] * s_stride_hd,
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    h = h.to(tl.float32)
                gw = tl.dot(tl.trans(dz_op), h, input_precision=INPUT_PRECISION)
                tl.atomic_add(
                    gw_base + offs_c[:, None] * D_S + d[None, :],
                    gw,
                    mask=col_mask[:, None] & d_mask[None, :],
                    sem="relaxed",
                )


# ----------------------------------------------------------------------------- host side


def _dot_options(*dtypes: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for the operand dtypes of one launch.

    DOT_FP32: bf16 under the CPU interpreter (see the module docstring). fp32 inputs follow
    PyTorch's global matmul setting: exact "ieee" products unless the user enabled TF32
    (torch.backends.cuda.matmul.allow_tf32)."""
    dot_fp32 = interpreter_active() and torch.bfloat16 in dtypes
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dot_fp32, precision


def _num_splits(num_row_blocks: int, num_tiles: int, device: torch.device) -> int:
    """Split the vocab across programs when there are too few row blocks to fill the GPU."""
    if device.type != "cuda":
        return 1
    target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(num_tiles, triton.cdiv(target_programs, max(num_row_blocks, 1))))


def _head_args(head: HeadSpec, bias: Optional[torch.Tensor], fallback: torch.Tensor) -> tuple:
    """(bias pointer, scale, softcap) runtime arguments and (HAS_BIAS, HAS_SOFTCAP) constexprs."""
    return ((bias.contiguous() if bias is not None else fallback), head.scale, head.softcap or 1.0), (
        bias is not None,
        bool(head.softcap),
    )


def _strides(hidden: Optional[torch.Tensor], weight: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    if hidden is None:
        return 0, 0, 0, 0
    return hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1)


def triton_forward(
    problem: StatsProblem,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    config: Optional[TritonTileConfig] = None,
    shards: Optional[VocabShards] = None,
) -> tuple[RowStats, Optional[torch.Tensor]]:
    """Fused forward. Returns (row statistics, div_aux) like `chunked.chunked_forward`, which
    also says what `shards` does."""
    if student_hidden.dtype == torch.float64 or (teacher_hidden is not None and teacher_hidden.dtype == torch.float64):
        raise TypeError("the triton backend takes float16, bfloat16 or float32 tensors, not float64")
    cfg = config or default_config(student_hidden.dtype)
    n, vocab = problem.num_tokens, problem.vocab_size
    dev = student_hidden.device
    targets = targets.contiguous()
    teacher = problem.has_teacher
    t_hidden = teacher_hidden if teacher else student_hidden  # dummy pointers when absent
    t_weight = teacher_weight if teacher else student_weight
    dot_fp32, precision = _dot_options(student_hidden.dtype, t_hidden.dtype)
    (s_bias, s_scale, s_cap), (s_has_bias, s_has_cap) = _head_args(problem.student_head, student_bias, student_weight)
    (t_bias, t_scale, t_cap), (t_has_bias, t_has_cap) = _head_args(
        problem.teacher_head if teacher else PLAIN_HEAD, teacher_bias if teacher else None, t_weight
    )
    heads = dict(S_HAS_BIAS=s_has_bias, S_HAS_SOFTCAP=s_has_cap, T_HAS_BIAS=t_has_bias, T_HAS_SOFTCAP=t_has_cap)
    num_row_blocks = triton.cdiv(n, cfg.block_n)
    num_tiles = triton.cdiv(vocab, cfg.block_v)
    splits = _num_splits(num_row_blocks, num_tiles, dev)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)  # no empty split
    partials = torch.zeros((splits, NUM_FIELDS, n), dtype=torch.float32, device=dev)
    kind = problem.divergence
    fwd_kind = kind if kind in (DIV_REVERSE_KL, DIV_FORWARD_KL) else DIV_NONE
    if n > 0:
        _token_stats_fwd_kernel[(num_row_blocks, splits)](
            student_hidden,
            student_weight,
            s_bias,
            t_hidden,
            t_weight,
            t_bias,
            targets,
            partials,
            n,
            vocab,
            student_hidden.shape[1],
            t_hidden.shape[1],
            *_strides(student_hidden, student_weight),
            *_strides(t_hidden, t_weight),
            problem.inv_temperature,
            tiles_per_split,
            s_scale,
            s_cap,
            t_scale,
            t_cap,
            HAS_TEACHER=teacher,
            DIVERGENCE=fwd_kind,
            BLOCK_N=cfg.block_n,
            BLOCK_V=cfg.block_v,
            BLOCK_D=cfg.block_d,
            DOT_FP32=dot_fp32,
            INPUT_PRECISION=precision,
            **heads,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    valid = targets != problem.ignore_index
    # The target logit lives in exactly one split (the others hold 0): a plain sum merges it.
    # The reverse-KL cross term is student-weighted and rescales with the student max; the
    # forward-KL one is teacher-weighted.
    m_s, s_s, a_s, cross_s = merge_splits(
        partials[:, F_M_S], partials[:, F_S_S], partials[:, F_A_S], partials[:, F_CROSS]
    )
    zy = partials[:, F_ZY].sum(0)
    if not teacher:
        return finalize(valid, StreamState(m_s, s_s, a_s, zy), shards=shards), None
    m_t, s_t, a_t, cross_t = merge_splits(
        partials[:, F_M_T], partials[:, F_S_T], partials[:, F_A_T], partials[:, F_CROSS]
    )
    uy = partials[:, F_UY].sum(0)
    cross = cross_s if kind == DIV_REVERSE_KL else cross_t
    state = StreamState(m_s, s_s, a_s, zy, m_t=m_t, s_t=s_t, a_t=a_t, uy=uy, cross=cross)
    stats = finalize(valid, state, kind, shards=shards)
    if kind == DIV_REVERSE_KL:
        return stats, stats.divergence
    if kind != DIV_JSD:
        return stats, None

    beta = problem.jsd_beta
    jsd_partials = torch.zeros((splits, 2, n), dtype=torch.float32, device=dev)
    if n > 0:
        _jsd_fwd_kernel[(num_row_blocks, splits)](
            student_hidden,
            student_weight,
            s_bias,
            teacher_hidden,
            teacher_weight,
            t_bias,
            stats.student_lse.contiguous(),
            stats.teacher_lse.contiguous(),
            jsd_partials,
            n,
            vocab,
            student_hidden.shape[1],
            teacher_hidden.shape[1],
            *_strides(student_hidden, student_weight),
            *_strides(teacher_hidden, teacher_weight),
            problem.inv_temperature,
            tiles_per_split,
            math.log(1.0 - beta),
            math.log(beta),
            s_scale,
            s_cap,
            t_scale,
            t_cap,
            BLOCK_N=cfg.block_n,
            BLOCK_V=cfg.block_v,
            BLOCK_D=cfg.block_d,
            DOT_FP32=dot_fp32,
            INPUT_PRECISION=precision,
            **heads,
            num_warps=cfg.jsd_num_warps,
            num_stages=cfg.num_stages,
        )
    return finish_jsd(stats, valid, jsd_partials.sum(0), beta, shards)


def backward_compiler_aborts(triton_version: str, capability: tuple[int, int], dtypes: set[torch.dtype]) -> bool:
    """Whether this Triton's compiler is known to abort on `_token_stats_bwd_kernel`'s default tiles.

    Triton 3.2.x (torch 2.6's) fails an assertion in LinearLayout::reshapeOuts on sm_90 for
    16-bit operands: the process dies with SIGABRT, no Python exception. Every other release
    from 3.0 to 3.9 compiles the kernel for sm_80 and sm_90, and 3.2 compiles it for sm_80 and for
    fp32 (`benchmarks/compile_matrix.py`, csrc_notes/token_stats.md)."""
    sixteen_bit = bool(dtypes & {torch.bfloat16, torch.float16})
    return triton_release(triton_version) == (3, 2) and capability[0] == 9 and sixteen_bit


def refuse_known_compiler_abort(device: torch.device, *operands: Optional[torch.Tensor]) -> None:
    """One clear line instead of a process that aborts inside Triton's compiler."""
    if device.type != "cuda" or interpreter_active():
        return
    capability = torch.cuda.get_device_capability(device)
    if backward_compiler_aborts(triton.__version__, capability, {t.dtype for t in operands if t is not None}):
        raise RuntimeError(
            f"backend='triton' cannot run its backward on sm_{capability[0]}{capability[1]} with "
            f"Triton {triton.__version__} and 16-bit weights: that compiler aborts on the kernel. "
            "Use backend='chunked' (what 'auto' runs) or Triton >= 3.3 (torch >= 2.7)"
        )


def triton_backward(
    problem: StatsProblem,
    inputs: BackwardInputs,
    *,
    need_hidden_grad: bool = True,
    need_weight_grad: bool = True,
    need_bias_grad: bool = False,
    config: Optional[TritonTileConfig] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One recompute per (row block, vocab block) tile; fp32 (grad_hidden, grad_weight, grad_bias)."""
    student_hidden, student_weight, targets, teacher_hidden, teacher_weight = inputs[:5]
    student_lse, student_entropy, teacher_lse, div_aux = inputs[5:9]
    grad_log_prob, grad_entropy, grad_divergence, student_bias, teacher_bias = inputs[9:]
    n, vocab = problem.num_tokens, problem.vocab_size
    d_s = student_hidden.shape[1]
    dev = student_hidden.device
    refuse_known_compiler_abort(dev, student_hidden, student_weight, teacher_hidden, teacher_weight)
    grad_hidden = torch.zeros((n, d_s), dtype=torch.float32, device=dev) if need_hidden_grad else None
    grad_weight = torch.zeros((vocab, d_s), dtype=torch.float32, device=dev) if need_weight_grad else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_bias_grad else None
    kind = inputs.divergence_kind(problem)
    if n == 0 or not (need_hidden_grad or need_weight_grad or need_bias_grad):
        return grad_hidden, grad_weight, grad_bias
    t_hidden = teacher_hidden if kind != DIV_NONE else student_hidden
    t_weight = teacher_weight if kind != DIV_NONE else student_weight
    dot_fp32, precision = _dot_options(student_hidden.dtype, t_hidden.dtype)
    (s_bias, s_scale, s_cap), (s_has_bias, s_has_cap) = _head_args(problem.student_head, student_bias, student_weight)
    (t_bias, t_scale, t_cap), (t_has_bias, t_has_cap) = _head_args(
        problem.teacher_head if kind != DIV_NONE else PLAIN_HEAD, teacher_bias if kind != DIV_NONE else None, t_weight
    )
    cfg = config or default_config(student_hidden.dtype, head=s_has_bias or s_has_cap or t_has_bias or t_has_cap)
    dummy = student_lse
    beta = problem.jsd_beta
    grid = (triton.cdiv(n, cfg.bwd_block_n), triton.cdiv(vocab, cfg.bwd_block_v))
    _token_stats_bwd_kernel[grid](
        student_hidden,
        student_weight,
        s_bias,
        t_hidden,
        t_weight,
        t_bias,
        targets.contiguous(),
        student_lse.contiguous(),
        student_entropy.contiguous(),
        teacher_lse.contiguous() if kind != DIV_NONE else dummy,
        div_aux.contiguous() if (div_aux is not None and kind != DIV_NONE) else dummy,
        grad_log_prob.contiguous(),
        grad_entropy.contiguous(),
        grad_divergence.contiguous() if kind != DIV_NONE else dummy,
        grad_hidden if grad_hidden is not None else dummy,
        grad_weight if grad_weight is not None else dummy,
        grad_bias if grad_bias is not None else dummy,
        n,
        vocab,
        d_s,
        t_hidden.shape[1],
        *_strides(student_hidden, student_weight),
        *_strides(t_hidden, t_weight),
        problem.inv_temperature,
        beta,
        math.log(1.0 - beta) if 0.0 < beta < 1.0 else 0.0,
        math.log(beta) if 0.0 < beta < 1.0 else 0.0,
        s_scale,
        s_cap,
        t_scale,
        t_cap,
        DIVERGENCE=kind,
        COMPUTE_DH=need_hidden_grad,
        COMPUTE_DW=need_weight_grad,
        COMPUTE_DB=need_bias_grad,
        BLOCK_N=cfg.bwd_block_n,
        BLOCK_V=cfg.bwd_block_v,
        BLOCK_D=cfg.bwd_block_d,
        DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision,
        S_HAS_BIAS=s_has_bias,
        S_HAS_SOFTCAP=s_has_cap,
        T_HAS_BIAS=t_has_bias,
        T_HAS_SOFTCAP=t_has_cap,
        num_warps=cfg.bwd_num_warps,
        num_stages=cfg.num_stages,
    )
    return grad_hidden, grad_weight, grad_bias
