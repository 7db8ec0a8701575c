"""Data parallelism for the trainer: process group from torchrun's environment, rollout chunks
dealt to ranks, the update under DistributedDataParallel, and rank-0 logging (docs: Many
processes).

    torchrun --nproc_per_node K -m fire_opd train ...   (gloo on CPU; on CUDA nccl, with gloo for CPU tensors)

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process.

Reproducibility across world sizes: rank r samples prompts [r P / K, (r + 1) P / K) of a step's
P prompts, and every rollout row draws from its own seed (seed, step, prompt, sample), whatever
rank holds it (fire_opd/train/rollouts.py; `my_prompts`). The FiRe
statistics are reduced over all ranks (fire_opd.algorithm), the loss of every rank is normalized by
the global count, and DistributedDataParallel averages the gradients (the loss is scaled by K):
1 or K processes give the same rollouts, statistics and parameters up to floating-point
reduction order.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.distributed as dist

# Payload bytes of the collectives this process took part in (gradients, FiRe statistics,
# metrics, FSDP's parameter all-gathers and gradient reduce-scatters); the trainer logs the
# per-step difference as train/comm_bytes. The payload b of an all-reduce is its tensor, of an
# all-gather its output, of a reduce-scatter its input. Over a ring each process sends and
# receives about 2 (K - 1) / K * b for an all-reduce and (K - 1) / K * b for the other two.
COMM_BYTES = [0]


def count(*tensors: torch.Tensor) -> None:
    COMM_BYTES[0] += sum(t.numel() * t.element_size() for t in tensors)


# The default process group's backend per device type. On CUDA tensors go through NCCL and CPU
# tensors through gloo: NCCL has no CPU collectives, and code that gathers a count or a metric on the
# CPU must not stop a multi-GPU run (`fire_kernels.vocab_parallel.collective_device` picks the device
# for groups made elsewhere, e.g. a pure NCCL group of accelerate's).
PROCESS_GROUP_BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device): initialize the default process group when launched by
    torchrun (WORLD_SIZE > 1), with `PROCESS_GROUP_BACKENDS[device.type]`; on CUDA each rank takes
    cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=PROCESS_GROUP_BACKENDS.get(device.type, "gloo"))
    return dist.get_rank(), dist.get_world_size(), device


# How long `teardown` leaves the GIL to gloo's worker threads between the barrier and the destroy.
GLOO_RELEASE_S = 0.05


def teardown() -> None:
    """Destroy the process group `setup` made, once every process is done with it.

    The pause between the barrier and the destroy is for torch releases older than
    pytorch/pytorch#154976 (June 2025): there the group's destructor holds the GIL while it joins
    gloo's worker threads, and a worker still releasing the barrier's prior work (a finished
    all-reduce of Python tensors) needs the GIL for it, so the two wait for each other forever
    (met under torch 2.6; docs/distributed.md). Sleeping gives the workers the GIL to finish first."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        time.sleep(GLOO_RELEASE_S)
        dist.destroy_process_group()


# group=LOCAL: this process's rows only, with no collective (for callers whose processes do not
# call the loss the same number of times, e.g. verl's dynamic micro-batches)
LOCAL = "local"


def active(group=None) -> bool:
    """Whether collectives over `group` (the default group when None) reach other processes."""
    if group == LOCAL:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """x reduced with `op` over `group`'s processes, into a new tensor on x's device (x itself for
    one process); through a device the group serves when x's is not one (`vocab_parallel.all_reduce`)."""
    from fire_kernels import vocab_parallel

    if not active(group):
        return x
    count(x)
    return vocab_parallel.all_reduce(x.clone(), op, group)


def barrier() -> None:
    if active():
        dist.barrier()


def my_prompts(prompts_per_step: int, chunk_prompts: int, rank: int, world: int) -> tuple[range, int]:
    """(the step's prompts rank `rank` samples and trains on, prompts per `generate` call).

    chunk_prompts 0: the step's prompts are dealt evenly, each process samples its share in one
    call. chunk_prompts c: the step is cut into chunks of c prompts, dealt evenly, one call each,
    so every process count batches the same prompts together (bit-identical rollouts, not only
    the same random draws)."""
    per_call = chunk_prompts or prompts_per_step // max(world, 1)
    chunks = prompts_per_step // per_call if per_call else 0
    if per_call == 0 or prompts_per_step % per_call or chunks % world:
        unit = f"chunks of sampling.rollout_chunk_prompts = {chunk_prompts} prompts" if chunk_prompts else "prompts"
        raise ValueError(
            f"sampling.prompts_per_step = {prompts_per_step} cannot be dealt evenly to {world} processes in {unit}; "
            f"use a number of processes that divides {chunks if chunk_prompts else prompts_per_step}"
        )
    per_rank = chunks // world * per_call
    return range(rank * per_rank, (rank + 1) * per_rank), per_call


PARALLEL_MODES = ("ddp", "fsdp")


def wrap(
    model: torch.nn.Module,
    device: torch.device,
    parallel: str = "ddp",
    ignore: Iterable[str] = (),
    *,
    layers_of: Optional[torch.nn.Module] = None,
    forward_methods: Iterable[str] = (),
):
    """The data-parallel wrapper of `model` when several processes run, else None.

    "ddp": DistributedDataParallel (every process holds the whole model; buffers are not
    broadcast before every forward, decoder LMs have no running statistics). "fsdp": FSDP2
    (`fully_shard`) on every decoder layer (the `_no_split_modules` classes of `layers_of`,
    default `model`) and on the whole model, so each process holds 1 / K of the parameters,
    gradients and optimizer state;
    the returned wrapper is the model itself, and `forward_methods` (methods of `model` that run
    its submodules, such as `generate`) gather the root's parameters as its forward does.
    `ignore`: names of parameters DDP leaves alone (vocab_parallel's lm_head shards, which differ
    between processes)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if not active():
        return None
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if (refusal := fsdp_refusal(next(model.parameters()).device.type)) is not None:
            raise RuntimeError(f"parallel: {refusal}")
        layers_of = model if layers_of is None else layers_of
        layer_classes = set(getattr(layers_of, "_no_split_modules", None) or [])
        layers = [m for m in layers_of.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(
                f"parallel: fsdp found no decoder layers in {type(layers_of).__name__} (its "
                "_no_split_modules names none); use parallel: ddp"
            )
        for layer in layers:
            fully_shard(layer)
            _count_fsdp_collectives(layer)
        fully_shard(model)
        _count_fsdp_collectives(model)
        for name in forward_methods:
            register_fsdp_forward_method(model, name)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    ignore = list(ignore)
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    # No buffer broadcast before every forward (a collective for nothing: decoder LMs have no
    # running statistics). torch 2.13 renamed the switch and warns on the old name.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync: dict[str, Any] = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def fsdp_refusal(device_type: str) -> Optional[str]:
    """Why FSDP2 cannot shard a model on `device_type` with this torch, or None. On CPU tensors
    (gloo) it is right from torch 2.9 only: 2.6 fails at the first all-gather (CPU streams have no
    record_event), and 2.7 / 2.8 sum the gradients where they should average them, K times too
    large without an error (pytorch/pytorch#162338). NCCL is unaffected."""
    if device_type == "cpu" and torch.__version__ < "2.9":
        return (
            f"fsdp on CPU needs torch >= 2.9, found {torch.__version__}: before it FSDP2 sums the gradients "
            "over gloo instead of averaging them (pytorch/pytorch#162338); use ddp on CPU"
        )
    return None


def _count_fsdp_collectives(module) -> None:
    """Count an FSDP2 module's all-gathers and reduce-scatters in COMM_BYTES, through FSDP2's
    custom-collective hooks (torch >= 2.8; on older torch they go uncounted)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
    except ImportError:
        return
    if not hasattr(module, "set_custom_all_gather"):
        return

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            count(output_tensor)
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            count(input_tensor)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    module.set_custom_all_gather(CountingAllGather())
    module.set_custom_reduce_scatter(CountingReduceScatter())


def wrap_teacher(
    model: torch.nn.Module, teacher_parallel: str = "replicate", *, layers_of: Optional[torch.nn.Module] = None
):
    """A frozen teacher sharded with FSDP2 ("fsdp": each process holds 1 / K of it, gathered layer
    by layer for every forward) or left whole on every process ("replicate", None returned)."""
    if teacher_parallel not in ("replicate", "fsdp"):
        raise ValueError(f"teacher_parallel must be 'replicate' or 'fsdp', got {teacher_parallel!r}")
    if teacher_parallel == "replicate" or not active():
        return None
    return wrap(model, torch.device("cpu"), "fsdp", layers_of=layers_of)


def is_fsdp(wrapper) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(wrapper, FSDPModule)


def full_state_dicts(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with full tensors on CPU, optimizer keyed by parameter
    names: the same format for one process, DDP and FSDP (a collective under FSDP: every rank
    calls it; rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Inverse of `full_state_dicts`: every rank passes the full dicts it read from disk."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def local_numel(parameters: Iterable[torch.nn.Parameter]) -> int:
    """Parameters this process holds: its shards under FSDP, everything otherwise."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in parameters)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended up to `rows`."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def all_gather_rows(x: torch.Tensor, group=None, counts: Optional[list[int]] = None) -> torch.Tensor:
    """Every process's rows of x ([n_r, ...], n_r may differ between processes) concatenated in
    rank order: one all-gather padded to the longest, after one of the row counts unless `counts`
    gives them (x itself for one process)."""
    from fire_kernels.vocab_parallel import collective_device, gathered_sizes

    if not active(group):
        return x
    if counts is None:
        counts = gathered_sizes(x.shape[0], group)
        count(torch.zeros(len(counts), dtype=torch.int64))
    device = collective_device(group, like=x.device)  # a CUDA tensor over gloo travels through the CPU
    padded = pad_rows(x.contiguous(), max(counts)).to(device)
    parts = [padded.new_empty(padded.shape) for _ in counts]
    count(*parts)  # an all-gather's payload is its output
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)


def count_gradients(parameters: Iterable[torch.nn.Parameter], skip: Iterable[torch.nn.Parameter] = ()) -> None:
    """Record the gradient payload DDP all-reduced (every gradient once per step, but `skip`'s)."""
    skipped = {id(p) for p in skip}
    count(*[p.grad for p in parameters if p.grad is not None and id(p) not in skipped])


def _host_values_device() -> torch.device:
    """Where the default group reduces counts and metrics (the CPU under `PROCESS_GROUP_BACKENDS`)."""
    from fire_kernels.vocab_parallel import collective_device

    return collective_device()


def max_over_ranks_each(values: list[int]) -> list[int]:
    """Element-wise maximum over ranks of a list of counts (one collective)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.int64, device=_host_values_device())
    count(t)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def mean_over_ranks(
    metrics: dict[str, float], *, summed: Iterable[str] = (), pooled: Mapping[str, tuple[float, float]] = {}
) -> dict[str, float]:
    """Metrics of this rank's rows -> the global value, in one collective: the mean over ranks
    (ranks hold equal numbers of rollouts), or the sum for the keys in `summed`. `pooled`: name ->
    (numerator, denominator) over this rank's rows, both summed over ranks before the division
    (a mean over rows of which each rank holds its own number; NaN where no rank has one). Every
    rank must pass the same keys."""
    names = sorted(pooled)
    if active():
        keys = sorted(metrics)
        flat = [float(metrics[k]) for k in keys] + [float(x) for name in names for x in pooled[name]]
        values = torch.tensor(flat, dtype=torch.float64, device=_host_values_device())
        count(values)
        dist.all_reduce(values)
        totals, world, summed = values.tolist(), dist.get_world_size(), set(summed)
        metrics = {k: v if k in summed else v / world for k, v in zip(keys, totals)}
        pooled = {name: (totals[len(keys) + 2 * i], totals[len(keys) + 2 * i + 1]) for i, name in enumerate(names)}
    ratios = {name: (pooled[name][0] / pooled[name][1] if pooled[name][1] > 0 else math.nan) for name in names}
    return {**metrics, **ratios}


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop signal seen by one process)."""
    if not active():
        return flag
    value = torch.tensor([1 if flag else 0], device=_host_values_device())
    count(value)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
