"""Vocabulary-parallel token statistics: each rank holds a contiguous shard of the lm_head rows.

Every rank passes the full hidden states [N, D], its shard W_r [V_r, D] (uneven shards allowed,
in rank order) and the global target ids; every rank gets the unsharded per-token outputs. Per
token chunk, with z the rank's slice of the logits (head and 1 / tau applied):

    pass 1   M = all_reduce_max(max_v z_v);  S = all_reduce_sum(sum_v exp(z_v - M));  lse = M + log S
    pass 2   with log p_v = z_v - lse known locally, one all_reduce_sum of the shard's part of
             [log p_y (on the rank that holds y), -sum p log p, the divergence's sum over v]

so communication is O(N) floats per statistic (a few [N] vectors), never O(N V). The
divergences are sums over the vocabulary of terms that only need the global lse of both models,
so the generalized JSD's mixture is as exact as the KLs. Backward recomputes the chunk's logits
and applies, per vocabulary entry (p student, q teacher, both global softmaxes):

    d logprob / dz_v = 1[v = y] - p_v
    d H / dz_v       = -p_v (log p_v + H)
    d KL(p||q) / dz_v = p_v (log p_v - log q_v - KL(p||q))
    d KL(q||p) / dz_v = p_v - q_v
    d JSD_b / dz_v   = (1 - b) p_v (log p_v - log m_v - KL(p||m)),  m = (1 - b) p + b q

then autograd through the rank's head for dW_r, db_r and the rank's part of dh; one
all_reduce_sum of dh [N, D] makes the hidden-state gradient complete on every rank. The logits
of one chunk ([chunk, V_r]) are the only vocabulary-sized tensors, as in the chunked backend.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ._validation import DIV_FORWARD_KL, DIV_NONE, DIV_REVERSE_KL, StatsProblem
from .reference import materialized_logits

TOKEN_CHUNK = 1024


def shard_offset(local_vocab: int, group) -> tuple[int, int]:
    """(first global row of this rank's shard, global V), from every rank's shard size."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([local_vocab], dtype=torch.int64), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    # gloo all-reduces CPU tensors only; NCCL CUDA ones: move only where needed
    if dist.get_backend(group) == "gloo" and x.device.type != "cpu":
        y = x.cpu()
        dist.all_reduce(y, op=op, group=group)
        return y.to(x.device)
    dist.all_reduce(x, op=op, group=group)
    return x


def _global_lse(z: torch.Tensor, group) -> torch.Tensor:
    """log sum_v exp z_v over every rank's shard, [n]."""
    m = _all_reduce(z.max(dim=-1).values.clone(), dist.ReduceOp.MAX, group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = _all_reduce(torch.exp(z - m[:, None]).sum(dim=-1), dist.ReduceOp.SUM, group)
    return m + torch.log(s)


def _divergence_terms(log_p: torch.Tensor, log_q: torch.Tensor, kind: int, beta: float):
    """Per-row shard sums of the divergence and (for JSD) of KL(p || m), given global log-probs."""
    p = log_p.exp()
    if kind == DIV_REVERSE_KL:
        return (p * (log_p - log_q)).sum(-1), None
    if kind == DIV_FORWARD_KL:
        q = log_q.exp()
        return (q * (log_q - log_p)).sum(-1), None
    log_m = torch.logaddexp(log_p + math.log(1.0 - beta), log_q + math.log(beta))
    kl_pm = (p * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_qm + (1.0 - beta) * kl_pm, kl_pm


class VocabParallelStats(torch.autograd.Function):
    """Outputs as FusedTokenStatsFunction: student logprob, entropy, teacher logprob, entropy,
    divergence (empty tensors where not asked)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, targets, problem: StatsProblem, group,
                token_chunk: int):
        offset, _ = shard_offset(s_weight.shape[0], group)
        local_vocab = s_weight.shape[0]
        valid = targets != problem.ignore_index
        acc = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        n = s_hidden.shape[0]
        out = {k: torch.zeros(n, dtype=acc, device=s_hidden.device)
               for k in ("lp", "h", "lse", "t_lp", "t_h", "t_lse", "div", "kl_pm")}
        teacher = problem.has_teacher
        for start in range(0, n, token_chunk):
            rows = slice(start, min(n, start + token_chunk))
            z = materialized_logits(s_hidden[rows], s_weight, problem.inv_temperature, problem.student_head, s_bias)
            lse = _global_lse(z, group)
            log_p = z - lse[:, None]
            local = [*_target_and_entropy(log_p, targets[rows], offset, local_vocab)]
            if teacher:
                zt = materialized_logits(t_hidden[rows], t_weight, problem.inv_temperature, problem.teacher_head,
                                         t_bias)
                t_lse = _global_lse(zt, group)
                log_q = zt - t_lse[:, None]
                local += [*_target_and_entropy(log_q, targets[rows], offset, local_vocab)]
                out["t_lse"][rows] = t_lse
                if problem.divergence:
                    div, kl_pm = _divergence_terms(log_p, log_q, problem.divergence, problem.jsd_beta)
                    local += [div, kl_pm if kl_pm is not None else torch.zeros_like(div)]
            summed = _all_reduce(torch.stack(local, dim=0), dist.ReduceOp.SUM, group)
            out["lse"][rows] = lse
            out["lp"][rows], out["h"][rows] = summed[0], summed[1]
            if teacher:
                out["t_lp"][rows], out["t_h"][rows] = summed[2], summed[3]
                if problem.divergence:
                    out["div"][rows], out["kl_pm"][rows] = summed[4], summed[5]
        zero = torch.zeros((), dtype=acc, device=s_hidden.device)
        for key in out:
            out[key] = torch.where(valid, out[key], zero)
        ctx.problem, ctx.group, ctx.token_chunk, ctx.offset = problem, group, token_chunk, offset
        div = bool(problem.divergence)
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden if div else None, t_weight if div else None,
                              t_bias if div else None, targets, out["lse"], out["h"], out["t_lse"], out["div"],
                              out["kl_pm"])
        empty = out["lp"].new_empty(0)
        outputs = (out["lp"], out["h"], out["t_lp"] if teacher else empty, out["t_h"] if teacher else empty,
                   out["div"] if div else empty)
        ctx.mark_non_differentiable(outputs[2], outputs[3])
        return outputs

    @staticmethod
    def backward(ctx, g_lp, g_h, _g_tlp, _g_th, g_div):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, targets, lse, entropy, t_lse, div, kl_pm = \
            ctx.saved_tensors
        problem: StatsProblem = ctx.problem
        group, offset = ctx.group, ctx.offset
        valid = targets != problem.ignore_index
        acc = lse.dtype

        def upstream(g):
            if g is None or g.numel() == 0:
                return torch.zeros_like(lse)
            return torch.where(valid, g.to(acc), torch.zeros((), dtype=acc, device=g.device))

        g_lp, g_h, g_div = upstream(g_lp), upstream(g_h), upstream(g_div)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(s_hidden.shape, dtype=acc, device=s_hidden.device) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=acc, device=s_weight.device) if need_w else None
        grad_b = torch.zeros(s_bias.shape, dtype=acc, device=s_bias.device) if need_b else None
        local_vocab = s_weight.shape[0]
        for start in range(0, s_hidden.shape[0], ctx.token_chunk):
            rows = slice(start, min(s_hidden.shape[0], start + ctx.token_chunk))
            with torch.enable_grad():
                h = s_hidden[rows].detach().requires_grad_(need_h)
                w = s_weight.detach().requires_grad_(need_w)
                b = s_bias.detach().requires_grad_(need_b) if s_bias is not None else None
                z = materialized_logits(h, w, problem.inv_temperature, problem.student_head, b)
            with torch.no_grad():
                log_p = z.detach() - lse[rows, None]
                p = log_p.exp()
                dz = -p * (g_lp[rows, None] + g_h[rows, None] * (log_p + entropy[rows, None]))
                local_target = targets[rows].long() - offset
                owned = valid[rows] & (local_target >= 0) & (local_target < local_vocab)
                if bool(owned.any()):
                    idx = owned.nonzero().squeeze(1)
                    dz[idx, local_target[idx]] += g_lp[rows][idx]
                if problem.divergence and bool(g_div[rows].any()):
                    zt = materialized_logits(t_hidden[rows], t_weight, problem.inv_temperature, problem.teacher_head,
                                             t_bias)
                    log_q = zt - t_lse[rows, None]
                    dz += g_div[rows, None] * _divergence_grad(log_p, p, log_q, div[rows], kl_pm[rows], problem)
            inputs = [t for t, need in ((h, need_h), (w, need_w), (b, need_b)) if need and t is not None]
            grads = iter(torch.autograd.grad(z, inputs, dz.to(z.dtype)) if inputs else ())
            if need_h:
                grad_h[rows] += next(grads).to(acc)
            if need_w:
                grad_w += next(grads).to(acc)
            if need_b and b is not None:
                grad_b += next(grads).to(acc)
        if grad_h is not None:  # every rank's shard contributes to dL/dh
            grad_h = _all_reduce(grad_h, dist.ReduceOp.SUM, group).to(s_hidden.dtype)
        return (grad_h, grad_w.to(s_weight.dtype) if grad_w is not None else None,
                grad_b.to(s_bias.dtype) if grad_b is not None else None, None, None, None, None, None, None, None)


def _target_and_entropy(log_p: torch.Tensor, targets: torch.Tensor, offset: int, local_vocab: int):
    """The shard's part of (log p_y, -sum p log p): log p_y only where y falls in this shard."""
    local = targets.long() - offset
    owned = (local >= 0) & (local < local_vocab)
    picked = log_p.gather(1, torch.where(owned, local, torch.zeros_like(local))[:, None]).squeeze(1)
    return torch.where(owned, picked, torch.zeros_like(picked)), -(log_p.exp() * log_p).sum(-1)


def _divergence_grad(log_p, p, log_q, div, kl_pm, problem: StatsProblem) -> torch.Tensor:
    if problem.divergence == DIV_REVERSE_KL:
        return p * (log_p - log_q - div[:, None])
    if problem.divergence == DIV_FORWARD_KL:
        return p - log_q.exp()
    beta = problem.jsd_beta
    log_m = torch.logaddexp(log_p + math.log(1.0 - beta), log_q + math.log(beta))
    return (1.0 - beta) * p * (log_p - log_m - kl_pm[:, None])


def vocab_parallel_stats(problem: StatsProblem, s_hidden, s_weight, targets, t_hidden, t_weight, *, s_bias, t_bias,
                         group, token_chunk: Optional[int] = None):
    if t_hidden is not None:
        t_hidden, t_weight = t_hidden.detach(), t_weight.detach()
        t_bias = t_bias.detach() if t_bias is not None else None
    outputs = VocabParallelStats.apply(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, targets, problem, group,
                                       token_chunk or TOKEN_CHUNK)
    return tuple(outputs[:2]) + tuple(outputs[i] if ok else None for i, ok in
                                      ((2, problem.has_teacher), (3, problem.has_teacher),
                                       (4, problem.divergence != DIV_NONE)))


__all__ = ["VocabParallelStats", "shard_offset", "vocab_parallel_stats"]
