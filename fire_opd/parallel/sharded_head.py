"""Vocabulary-parallel lm_heads for the data-parallel trainer (`vocab_parallel: true`).

Each of K processes keeps rows [offset_r, offset_r + V_r) of the student's and every teacher's
lm_head (V_r = V / K, the first V mod K processes one more), so no process holds a whole lm_head,
its gradient or its AdamW state. Processes hold different rollouts, while vocabulary-parallel
statistics (`fire_kernels.vocab_parallel`) need every process to see the same tokens, so each
statistic runs over the tokens of all processes:

    gather_tokens   all-gather of each process's response tokens (hidden states [n_r, D],
                    targets, coefficients), as Megatron's sequence-parallel gather; its backward
                    reduce-scatters dL/dh, so every process gets the complete gradient of its own
                    tokens from every shard's part (the kernels run with reduce_hidden_grad=False)
    statistics      on the gathered tokens with this process's shards, the same outputs on every
                    process; each keeps its own tokens' values

The loss of every process is then the loss of all processes' tokens. Its gradient w.r.t. the
process's own hidden states is that of its tokens in the whole batch: DDP averages the decoder
gradients with the usual factor K in the loss. The lm_head shards are left out of DDP (each is
the whole batch's gradient for its rows already) and their gradient is divided by that K.

Generation needs whole-vocabulary logits for each process's own rows: `ShardedLMHead.forward`
all-gathers the hidden states of the step, multiplies them by its rows and hands every process
the logits of its rows (an all-to-all), so `generate` runs unchanged with `synced_gpus=True`
(every process makes the same number of forward calls).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fire_kernels.vocab_parallel import all_reduce, gathered_sizes
from fire_opd.parallel import distributed


def shard_rows(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): the rows of a V-row head that process `rank` of `world` holds."""
    base, extra = divmod(vocab_size, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard_layout(rows: int, world: int, vocab_size: Optional[int] = None) -> list[tuple[int, int]]:
    """[lo, hi) of every process's rows of a `rows`-row head: the vocabulary's `vocab_size` rows
    (all of them by default) dealt evenly, and the padding rows past it to the last process, so
    that every process's shard starts at the same row in every head (student and teachers may
    be padded differently) and none holds padding only."""
    valid = rows if vocab_size is None else vocab_size
    if valid < world:
        raise ValueError(f"parallel.vocab: a vocabulary of {valid} tokens cannot be sharded over {world} processes")
    bounds = [shard_rows(valid, r, world) for r in range(world)]
    bounds[-1] = (bounds[-1][0], rows)
    return bounds


class _GatherTokens(torch.autograd.Function):
    """Forward: all processes' rows; backward: each process's rows of the summed gradient."""

    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.counts, ctx.group = counts, group
        return distributed.all_gather_rows(x, group, counts)

    @staticmethod
    def backward(ctx, grad):
        distributed.count(grad)
        # gloo has no reduce-scatter: an all-reduce, then this process's rows
        grad = all_reduce(grad.clone(), dist.ReduceOp.SUM, ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.counts[:rank])
        return grad[start : start + ctx.counts[rank]], None, None


def gather_tokens(group, *tensors: Optional[torch.Tensor]) -> tuple[list[Optional[torch.Tensor]], slice]:
    """All processes' rows of each tensor (each [n_r, ...], the same n_r per process), and the
    slice of this process's rows in them. Gradients flow back to this process's rows only, summed
    over every process's use of them."""
    n = next(t.shape[0] for t in tensors if t is not None)
    counts = gathered_sizes(n, group)
    rank = dist.get_rank(group)
    start = sum(counts[:rank])
    out = [
        None
        if t is None
        else _GatherTokens.apply(t, counts, group)
        if t.requires_grad
        else distributed.all_gather_rows(t, group, counts)
        for t in tensors
    ]
    return out, slice(start, start + n)


class ShardedLMHead(nn.Module):
    """This process's rows of a causal LM's lm_head: weight [V_r, D] (bias [V_r]), rows
    [offset, offset + V_r) of `vocab_size`, over `group`. `forward` (generation and evaluation,
    no gradient) returns whole-vocabulary logits for the caller's own hidden states; training
    reads `weight` through the fused kernels with `vocab_process_group=group`."""

    def __init__(
        self, weight: torch.Tensor, bias: Optional[torch.Tensor], vocab_size: int, group, valid: Optional[int] = None
    ):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=bias.requires_grad)
        self.vocab_size, self.group = vocab_size, group
        # every process's rows [lo, hi), fixed by shard_layout: no collective needed to know them
        layout = shard_layout(vocab_size, dist.get_world_size(group), valid)
        self.rows_per_process = [hi - lo for lo, hi in layout]
        self.offset = layout[dist.get_rank(group)][0]
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def shard(cls, model: nn.Module, name: str, group, valid: Optional[int] = None) -> "ShardedLMHead":
        """Replace `model`'s lm_head by this process's rows of it (a copy; the whole head is freed).
        `valid`: the tokenizer's vocabulary when the head is padded past it (`shard_layout`)."""
        head: Any = model.get_output_embeddings()  # type: ignore[operator]
        get_inputs = getattr(model, "get_input_embeddings", None)
        inputs = get_inputs() if callable(get_inputs) else None
        if inputs is not None and getattr(inputs, "weight", None) is head.weight:
            raise ValueError(
                f"vocab_parallel: true shards lm_heads, but {name} ties its lm_head to its input "
                "embeddings (tie_word_embeddings); untie it or use parallel: fsdp"
            )
        vocab = head.weight.shape[0]
        lo, hi = shard_layout(vocab, dist.get_world_size(group), valid)[dist.get_rank(group)]

        def rows(t):
            return None if t is None else t.detach()[lo:hi].clone().requires_grad_(t.requires_grad)

        sharded = cls(rows(head.weight), rows(getattr(head, "bias", None)), vocab, group, valid)
        model.set_output_embeddings(sharded)  # type: ignore[operator]
        return sharded

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.requires_grad:
            raise RuntimeError(
                "ShardedLMHead computes logits for generation only; training reads its weight "
                "through fire_kernels with vocab_process_group"
            )
        with torch.no_grad():
            return self._logits(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        lead = hidden.shape[:-1]
        flat = hidden.reshape(-1, hidden.shape[-1])
        counts = gathered_sizes(flat.shape[0], self.group)
        everyone = distributed.all_gather_rows(flat, self.group, counts)  # [sum n, D]: every process's rows
        logits = F.linear(
            everyone, self.weight.to(everyone.dtype), None if self.bias is None else self.bias.to(everyone.dtype)
        )
        # all-to-all: process j gets its own rows of every process's vocabulary columns
        rows = max(counts)
        starts = [sum(counts[:j]) for j in range(len(counts))]
        send = [distributed.pad_rows(logits[s : s + c], rows).contiguous() for s, c in zip(starts, counts)]
        recv = [logits.new_empty((rows, w)) for w in self.rows_per_process]
        _all_to_all(recv, send, self.group)
        mine = torch.cat(recv, dim=1)[: flat.shape[0]]
        return mine.view(*lead, self.vocab_size)

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole [V, ...] tensor from every process's rows of `tensor` (a collective)."""
        return distributed.all_gather_rows(tensor.detach(), self.group, self.rows_per_process)

    def rows(self, full: torch.Tensor) -> torch.Tensor:
        """This process's rows of a whole [V, ...] tensor."""
        return full[self.offset : self.offset + self.weight.shape[0]]


def _all_to_all(recv: list[torch.Tensor], send: list[torch.Tensor], group) -> None:
    """recv[i] <- what process i sent to this one, by point-to-point exchanges (gloo has no
    all-to-all for tensors of different shapes)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    distributed.count(*send)
    recv[rank].copy_(send[rank])
    for shift in range(1, world):
        to, frm = (rank + shift) % world, (rank - shift) % world
        ops = [
            dist.P2POp(dist.isend, send[to], dist.get_global_rank(group, to), group),
            dist.P2POp(dist.irecv, recv[frm], dist.get_global_rank(group, frm), group),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def shard_lm_heads(student: nn.Module, teachers: dict[str, nn.Module], group, vocab_size: Optional[int] = None) -> None:
    """Keep this process's rows of the student's and every teacher's lm_head, over `group`
    (`vocab_size`: the shared vocabulary of padded heads, `shard_layout`)."""
    ShardedLMHead.shard(student, "the student", group, vocab_size)
    for name, teacher in teachers.items():
        ShardedLMHead.shard(teacher, f"teacher {name!r}", group, vocab_size)


def sharded_heads(model: nn.Module) -> dict[str, ShardedLMHead]:
    """Module name -> ShardedLMHead inside `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ShardedLMHead)}


def sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for head in sharded_heads(model).values() for p in head.parameters()]


def sharded_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in `model.named_parameters()`) of the lm_head shards' parameters."""
    return [f"{name}.{param}" for name, head in sharded_heads(model).items() for param, _ in head.named_parameters()]


def gather_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Whole lm_head weights and AdamW moments into the full state dicts, in place. A collective:
    every process gathers from its own parameters and optimizer (the dicts may be filled on
    rank 0 only, as torch's full state dicts are)."""
    for name, head in sharded_heads(model).items():
        for param_name in ("weight", "bias"):
            param = getattr(head, param_name)
            if param is None:
                continue
            key = f"{name}.{param_name}"
            model_state[key] = head.full(param).cpu()
            moments = optimizer.state.get(param, {}) if optimizer is not None else {}
            for moment in sorted(moments):
                value = moments[moment]
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    whole = head.full(value).cpu()
                    optimizer_state.setdefault("state", {}).setdefault(key, {})[moment] = whole


def slice_state(model: nn.Module, model_state: dict, optimizer_state: dict) -> None:
    """Inverse of `gather_state`: this process's rows of whole lm_head tensors, in place."""
    for name, head in sharded_heads(model).items():
        for param in ("weight", "bias"):
            key = f"{name}.{param}"
            if key in model_state:
                model_state[key] = head.rows(model_state[key])
            moments = optimizer_state.get("state", {}).get(key, {})
            for moment, value in moments.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    moments[moment] = head.rows(value)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """`clip_grad_norm_` over all processes' parameters: the decoder's gradients are the same on
    every process (after DDP), the lm_head shards' differ, so their squares are summed over processes."""
    heads = {id(p) for h in sharded_heads(model).values() for p in h.parameters()}
    grads = [(p.grad, id(p) in heads) for p in model.parameters() if p.grad is not None]
    replicated = sum(
        (g.double().pow(2).sum() for g, sharded in grads if not sharded), torch.zeros((), dtype=torch.float64)
    )
    sharded = sum((g.double().pow(2).sum() for g, sharded in grads if sharded), torch.zeros((), dtype=torch.float64))
    group = next(iter(sharded_heads(model).values())).group
    distributed.count(sharded)
    sharded = all_reduce(sharded, dist.ReduceOp.SUM, group)  # on a device the group serves
    total = float((replicated.cpu() + sharded.cpu()).sqrt())
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for g, _ in grads:
            g.mul_(coefficient)
    return total


__all__ = [
    "ShardedLMHead",
    "clip_grad_norm",
    "gather_state",
    "gather_tokens",
    "shard_lm_heads",
    "shard_rows",
    "sharded_heads",
    "sharded_parameter_names",
    "sharded_parameters",
    "slice_state",
]
