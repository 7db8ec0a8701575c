"""Vocabulary-parallel token statistics: each rank holds a contiguous shard of the lm_head rows.

Every rank passes the full hidden states [N, D], its shard W_r [V_r, D] (uneven shards allowed,
in rank order) and the global target ids; every rank gets the unsharded per-token outputs. The
backends need no sharded variant: a vocabulary shard is to the whole vocabulary what one of the
Triton forward's vocab splits is to a rank's shard. Each backend (chunked, its CUDA tile folds,
triton) sweeps the rank's shard and ends with the O(N) streaming state of `_row_stats`

    m = max_v z_v,  S = sum_v e^{z_v - m},  A = sum_v e^{z_v - m} (z_v - m),  z_y,  the KL cross term K

(and the teacher's), which `VocabShards.merge_state` merges across ranks with the rule that
merges splits, before `finalize` turns it into log-probs, entropies and KLs:

    M = all_reduce_max(m);   S = all_reduce_sum(e^{m - M} S);   A = all_reduce_sum(e^{m - M} (A + (m - M) S))
    K = all_reduce_sum(e^{m - M} K);   z_y = all_reduce_sum(z_y on the rank that holds y, 0 elsewhere)

The generalized JSD's second sweep runs on each shard with the merged (global) lse of both
models, so its per-shard sums of p log(p / M) and q log(q / M) add up exactly (`sum`).

Backward is the backend's own on the shard: it reads only global per-row statistics (lse,
entropy, divergence) and recomputes the shard's logits, so dz for the shard's columns,
dW_r = dz^T h and db_r are exact; dh = dz W_r is the shard's part, and one all-reduce of
dh [N, D] makes the hidden-state gradient complete on every rank (`reduce_hidden_grad=False`
leaves the shard's part, for callers whose layer before the head reduces it, as Megatron's
column-parallel input copy and sequence-parallel gather do).

Communication per call: one max all-reduce of [2, N] and one sum all-reduce of [7, N] in the
forward ([2, N] more for the JSD), [N, D] in the backward: O(N) floats per statistic, never
O(N V). Targets are mapped to shard-local ids: a target held by another rank becomes -1 (it
matches no column, so the rank adds no z_y and no one-hot gradient), ignored rows become -2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist

from fire_kernels._validation import DIV_REVERSE_KL
from fire_kernels.lm_head import LMHead

OTHER_SHARD = -1  # local id of a target that another rank's shard holds
LOCAL_IGNORE = -2  # local ignore_index: cannot collide with a shard-local id (>= 0) or OTHER_SHARD


def collective_device(group=None, like: Optional[torch.device] = None) -> torch.device:
    """The device whose tensors `group`'s backend reduces: `like` when the backend serves its
    device type, else the CPU when it has a CPU backend (gloo, or a 'cpu:gloo,cuda:nccl' group),
    else the current accelerator. NCCL has no CPU collectives ("No backend type associated with
    device type cpu"), and gloo reduces CUDA tensors only for some operations: every collective
    of small host-side values (counts, sizes, metrics) goes through here instead of assuming
    the CPU."""
    config = dist.distributed_c10d.BackendConfig(dist.Backend(str(dist.get_backend_config(group))))
    served = {kind for kind, name in config.get_device_backend_map().items() if name != "gloo" or kind == "cpu"}
    if like is not None and like.type in served:
        return like
    if "cpu" in served:
        return torch.device("cpu")
    kind = next(iter(sorted(served)))
    module = getattr(torch, kind)
    return torch.device(kind, module.current_device())


def gathered_sizes(n: int, group) -> list[int]:
    """Every rank's `n`, in rank order (one all-gather)."""
    device = collective_device(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    return [int(s) for s in sizes]


def shard_offset(local_vocab: int, group) -> tuple[int, int]:
    """(first global row of this rank's shard, global V), from every rank's shard size."""
    sizes = gathered_sizes(local_vocab, group)
    return sum(sizes[: dist.get_rank(group)]), sum(sizes)


def all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    """`dist.all_reduce` of x (in place where it can be), returned; x travels through a device
    the group's backend serves when its own is not one (a CUDA tensor over gloo)."""
    device = collective_device(group, like=x.device)
    if device != x.device:
        y = x.to(device)
        dist.all_reduce(y, op=op, group=group)
        return y.to(x.device)
    dist.all_reduce(x, op=op, group=group)
    return x


@dataclass(frozen=True)
class VocabShards:
    """This rank's place in a vocabulary-sharded lm_head: rows [offset, offset + local_vocab) of
    vocab_size, over `group`. Passed to a backend's forward (`shards=`) to merge the streaming
    state across ranks, and used by the autograd Function to complete dL/dh."""

    group: Any
    offset: int
    local_vocab: int
    vocab_size: int
    reduce_hidden_grad: bool = True  # False: dL/dh stays this shard's part (the caller reduces it)

    def localize(self, targets: torch.Tensor, problem):
        """(targets, problem) as a backend sees the shard: global ids -> ids in this shard,
        OTHER_SHARD where another rank holds the target, LOCAL_IGNORE (the problem's new
        ignore_index) where the row is ignored."""
        local = targets.long() - self.offset
        owned = (local >= 0) & (local < self.local_vocab)
        local = torch.where(owned, local, torch.full_like(local, OTHER_SHARD))
        local = torch.where(targets == problem.ignore_index, torch.full_like(local, LOCAL_IGNORE), local)
        return local, dataclasses.replace(problem, ignore_index=LOCAL_IGNORE)

    def merge_state(self, state, divergence: int = 0):
        """Merge every rank's streaming state (a `_row_stats.StreamState`; module docstring)
        into the whole vocabulary's, of the same type."""
        m_s, s_s, a_s, zy, m_t, s_t, a_t, uy, cross = state
        teacher = m_t is not None
        local_max = torch.stack([m_s, m_t]) if teacher else m_s[None]
        global_max = all_reduce(local_max.clone(), dist.ReduceOp.MAX, self.group)
        shift = local_max - global_max
        scale = torch.exp(shift)
        parts = [scale[0] * s_s, scale[0] * (a_s + shift[0] * s_s), zy]
        if teacher:
            parts += [scale[1] * s_t, scale[1] * (a_t + shift[1] * s_t), uy]
        if cross is not None:  # reverse KL's cross term is student-weighted, forward KL's teacher-weighted
            parts.append(scale[0 if divergence == DIV_REVERSE_KL else 1] * cross)
        summed = all_reduce(torch.stack(parts), dist.ReduceOp.SUM, self.group)
        student = {"m_s": global_max[0], "s_s": summed[0], "a_s": summed[1], "zy": summed[2]}
        if not teacher:
            return state._replace(**student)
        return state._replace(
            **student,
            m_t=global_max[1],
            s_t=summed[3],
            a_t=summed[4],
            uy=summed[5],
            cross=summed[6] if cross is not None else None,
        )

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (the JSD's per-shard sums, the shards' parts of dL/dh)."""
        return all_reduce(x.contiguous(), dist.ReduceOp.SUM, self.group)


def shards_of(weight, group, reduce_hidden_grad: bool = True) -> Optional[VocabShards]:
    """This rank's VocabShards for a [V_r, D] `weight` shard over `group`; None without a group
    (or for a weight the input checks will refuse)."""
    if group is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    offset, vocab_size = shard_offset(weight.shape[0], group)
    return VocabShards(group, offset, weight.shape[0], vocab_size, bool(reduce_hidden_grad))


def merged(shards: Optional[VocabShards], x: torch.Tensor) -> torch.Tensor:
    """`shards.sum(x)`, or x itself when the vocabulary is not sharded."""
    return x if shards is None else shards.sum(x)


def complete_hidden_grad(shards: Optional[VocabShards], grad_hidden: torch.Tensor) -> torch.Tensor:
    """dL/dh over the whole vocabulary: the shards' parts summed, unless the caller reduces them."""
    return merged(shards if shards is not None and shards.reduce_hidden_grad else None, grad_hidden)


__all__ = [
    "LOCAL_IGNORE",
    "OTHER_SHARD",
    "VocabShards",
    "all_reduce",
    "complete_hidden_grad",
    "gathered_sizes",
    "merged",
    "shard_offset",
    "shards_of",
]


def valid_rows(vocab_size: Optional[int], group, *weights_and_biases: Any) -> tuple[Any, ...]:
    """The rows of each lm_head weight [V_pad, D] / bias [V_pad] that lie inside the vocabulary's
    first `vocab_size` ids, as views (nothing is copied): the rows past it are the padding models
    add to round V up (Qwen2.5-7B has 152,064 rows, Qwen2.5-1.5B 151,936, for one tokenizer), and
    they take no part in any softmax. None leaves every row in.

    With a vocab `group` the tensors are this rank's shards and `vocab_size` counts the whole
    vocabulary: each rank keeps the part of its shard below it (the padding is the last rows)."""
    if vocab_size is None:
        return weights_and_biases
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int (the tokenizer's vocabulary size), got {vocab_size!r}")
    tensors = [t for t in weights_and_biases if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not tensors:
        return weights_and_biases
    offset, total = shard_offset(tensors[0].shape[0], group) if group is not None else (0, tensors[0].shape[0])
    out: list[Any] = []
    for t in weights_and_biases:
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            out.append(t)
            continue
        rows = t.shape[0] if group is None else total
        if vocab_size > rows:
            raise ValueError(
                f"vocab_size {vocab_size} exceeds the {rows} rows of an lm_head weight or bias; it must be at "
                "most every head's number of rows"
            )
        out.append(t[: max(0, min(vocab_size - offset, t.shape[0]))])
    return tuple(out)


def valid_head_rows(vocab_size: Optional[int], group, *heads: Optional[LMHead]) -> tuple[Optional[LMHead], ...]:
    """`valid_rows` of each head's weight and bias (views), None heads passed through."""
    out: list[Optional[LMHead]] = []
    for head in heads:
        if head is None or vocab_size is None:
            out.append(head)
            continue
        weight, bias = valid_rows(vocab_size, group, head.weight, head.bias)
        out.append(replace(head, weight=weight, bias=bias))
    return tuple(out)
