"""Data parallelism for the trainer: process group from torchrun's environment, rollout chunks
dealt to ranks, the update under DistributedDataParallel, and rank-0 logging (DESIGN.md, "The
trainer at scale").

    torchrun --nproc_per_node K -m fire_opd train ...   (gloo on CPU, nccl on CUDA)

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process.

Reproducibility across world sizes: a step's prompts are cut into chunks of
`rollout_chunk_prompts` prompts; chunk c of step s is sampled with its own seed
(seed, s, c), whatever rank holds it, and rank r holds chunks [r n / K, (r + 1) n / K). The FiRe
statistics are reduced over all ranks (fire_opd.loss), the loss of every rank is normalized by
the global count, and DistributedDataParallel averages the gradients (the loss is scaled by K):
1 or K processes give the same rollouts, statistics and parameters up to floating-point
reduction order.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist


# Payload bytes this process handed to collectives (gradients, FiRe statistics, metrics); the
# trainer logs the per-step difference as train/comm_bytes. A ring all-reduce of b bytes sends
# and receives about 2 (K - 1) / K * b per process.
COMM_BYTES = [0]


def count(*tensors: torch.Tensor) -> None:
    COMM_BYTES[0] += sum(t.numel() * t.element_size() for t in tensors)


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device): initialize the default process group when launched by
    torchrun (WORLD_SIZE > 1); on CUDA each rank takes cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """Sampling seed of one rollout chunk; chunk 0 keeps the single-chunk trainer's step seed."""
    return (seed * 1_000_003 + step + chunk * 7_919_113) % (2**31)


def my_chunks(num_chunks: int, rank: int, world: int) -> range:
    """The contiguous block of chunk indices rank `rank` samples and trains on."""
    if num_chunks % world:
        raise ValueError(f"{num_chunks} rollout chunks per step cannot be dealt evenly to {world} processes; make "
                         "prompts_per_step / rollout_chunk_prompts a multiple of the number of processes")
    per_rank = num_chunks // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    """DistributedDataParallel around the student when several processes run, else None. Buffers
    are not broadcast (decoder LMs have no running statistics)."""
    if not active():
        return None
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def forward_through(wrapper, module: torch.nn.Module, fn, *args, **kwargs):
    """`fn(*args)` run as the forward of `wrapper` (DDP), so that DDP's forward and backward hooks
    see it, although `fn` computes hidden states rather than the module's logits (the fused loss
    needs no logits). Without a wrapper, just `fn(*args)`."""
    if wrapper is None:
        return fn(*args, **kwargs)
    original = module.forward

    def redirected(*_args, **_kwargs):
        module.forward = original
        return fn(*args, **kwargs)

    module.forward = redirected
    try:
        return wrapper()
    finally:
        module.forward = original


def count_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Record the gradient payload DDP all-reduced (every gradient once per step)."""
    count(*[p.grad for p in parameters if p.grad is not None])


def max_over_ranks(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value])
    count(t)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean_over_ranks(metrics: dict[str, float], *, summed: Iterable[str] = ()) -> dict[str, float]:
    """Metrics of this rank's rows -> the global value: the mean over ranks (ranks hold equal
    numbers of rollouts), or the sum for the keys in `summed`. Every rank must pass the same keys."""
    if not active():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    count(values)
    dist.all_reduce(values)
    world = dist.get_world_size()
    summed = set(summed)
    return {k: float(v) if k in summed else float(v) / world for k, v in zip(keys, values.tolist())}


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop signal seen by one process)."""
    if not active():
        return flag
    value = torch.tensor([1 if flag else 0])
    count(value)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
