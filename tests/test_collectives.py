"""Collectives on the devices the process group serves: NCCL has no CPU collectives.

Every distributed test here runs gloo on the CPU, which reduces CPU tensors; a multi-GPU run's
NCCL group reduces CUDA tensors only ("No backend type associated with device type cpu"). These
tests pin what a CUDA run would meet without one: the group `setup` makes on CUDA, and the
device every collective of host-side values (counts, sizes, metrics) picks for a given group.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fire_kernels import vocab_parallel
from fire_opd.parallel import distributed


def _served(backend: str) -> dict:
    return dist.distributed_c10d.BackendConfig(backend).get_device_backend_map()


def test_a_cuda_run_makes_a_group_that_reduces_cpu_and_cuda_tensors(monkeypatch):
    """torchrun on GPUs: the default group takes NCCL for CUDA tensors and gloo for CPU ones,
    so a metric or a count all-reduced on the CPU does not stop the run at the first step."""
    made = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: made.setdefault("device", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: made.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    rank, world, device = distributed.setup(torch.device("cuda"))
    assert (rank, world, device) == (1, 2, torch.device("cuda", 1)) and made["device"] == torch.device("cuda", 1)
    assert _served(made["backend"]) == {"cpu": "gloo", "cuda": "nccl"}


@pytest.mark.parametrize(
    "config,like,expected",
    [
        ("cuda:nccl", None, "cuda:0"),  # a pure NCCL group (accelerate's): counts go to the GPU
        ("cuda:nccl", "cpu", "cuda:0"),
        ("cuda:nccl", "cuda:1", "cuda:1"),
        ("cpu:gloo,cuda:nccl", None, "cpu"),  # ours on CUDA
        ("cpu:gloo,cuda:nccl", "cuda:1", "cuda:1"),  # a CUDA tensor stays where it is, through NCCL
        ("cpu:gloo,cuda:gloo", "cuda:0", "cpu"),  # gloo: CUDA tensors travel through the CPU
        ("cpu:gloo,cuda:gloo", None, "cpu"),
    ],
)
def test_collective_device_follows_the_groups_backends(monkeypatch, config, like, expected):
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    device = vocab_parallel.collective_device(None, like=torch.device(like) if like else None)
    assert device == torch.device(expected)


class _NcclLike:
    """Stands in for a pure NCCL group: refuses CPU tensors as NCCL does, records the devices."""

    def __init__(self):
        self.devices: list[str] = []

    def check(self, *tensors):
        for t in tensors:
            self.devices.append(t.device.type)
            if t.device.type == "cpu":
                raise RuntimeError("No backend type associated with device type cpu")

    def all_reduce(self, tensor, op=None, group=None):
        self.check(tensor)

    def all_gather(self, parts, tensor, group=None):
        self.check(tensor, *parts)
        for p in parts:
            p.copy_(tensor)


def test_host_value_collectives_go_where_the_group_reduces(monkeypatch):
    """mean_over_ranks, any_rank, max_over_ranks_each, gathered_sizes, all_gather_rows and all_reduce put
    their tensors on `collective_device`: on a group that refuses CPU tensors (faked here, the
    "accelerator" being the CPU under another name) none reaches it on the CPU."""
    fake = _NcclLike()
    monkeypatch.setattr(dist, "all_reduce", fake.all_reduce)
    monkeypatch.setattr(dist, "all_gather", fake.all_gather)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "active", lambda group=None: True)
    # the device the group serves: the meta device has no data, so the values are read back
    # through a CPU copy that the fake hands over
    served = torch.device("meta")
    monkeypatch.setattr(vocab_parallel, "collective_device", lambda group=None, like=None: served)
    with pytest.raises((NotImplementedError, RuntimeError)) as meta_read:
        distributed.mean_over_ranks({"a": 1.0})
    assert "No backend type" not in str(meta_read.value)  # it reached the collective on the served device
    for call in (
        lambda: distributed.any_rank(True),
        lambda: distributed.max_over_ranks_each([3, 4]),
        lambda: vocab_parallel.gathered_sizes(5, None),
        lambda: distributed.all_gather_rows(torch.ones(2, 3), None, counts=[2, 2]),
        lambda: distributed.all_reduce(torch.ones(2)),  # the FiRe selection's and the loss normalizer's
    ):
        with pytest.raises((NotImplementedError, RuntimeError)) as raised:
            call()
        assert "No backend type" not in str(raised.value)
    assert fake.devices and set(fake.devices) == {"meta"}


def test_the_fire_selection_reduces_its_statistics_in_four_all_reduces(monkeypatch):
    """compute_fire_advantages over a process group: every collective is a latency on NCCL and a
    wait for the device, so the batch's statistics travel together (the entropy maxima, the token
    totals, the weights' range, and every reported ratio and mean as one [k, 2] tensor), and the
    filter's scores in one gather, however many metrics the selection reports."""
    from fire_opd.algorithm.options import FireOptions
    from fire_opd.algorithm.selection import compute_fire_advantages

    calls: list[tuple[str, int]] = []

    def all_reduce(tensor, op=None, group=None):  # a second process that holds nothing: x + 0
        calls.append(("all_reduce", tensor.numel()))

    def all_gather(parts, tensor, group=None):
        calls.append(("all_gather", tensor.numel()))
        parts[0].copy_(tensor)
        parts[1].zero_()

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(vocab_parallel, "collective_device", lambda group=None, like=None: like or torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    b, t = 6, 5
    mask = torch.rand(b, t, generator=g) > 0.2
    per_token = [torch.randn(b, t, generator=g) for _ in range(2)] + [torch.rand(b, t, generator=g) for _ in range(2)]
    selection = compute_fire_advantages(*per_token, mask, fire=FireOptions(method="fire", filter_mode="truncate"))
    assert [name for name, _ in calls].count("all_reduce") == 4, calls
    assert [name for name, _ in calls].count("all_gather") == 2, calls  # the score counts, then the scores
    assert ("all_reduce", 2 * 10) in calls  # 10 ratios and means, each a (numerator, denominator) pair
    assert {"fire/keep_ratio", "fire/truncated_ratio", "fire/weight_min", "fire/student_entropy_mean"} <= set(
        selection.metrics
    )


def _ddp_wrap_worker(rank: int, world: int) -> None:
    import warnings

    distributed.active = lambda group=None: True  # a group of one process, wrapped as if it were two
    model = torch.nn.Linear(3, 2)
    model.register_buffer("table", torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch 2.13: broadcast_buffers is deprecated
        wrapper = distributed.wrap(model, torch.device("cpu"))
    assert wrapper is not None and wrapper.broadcast_buffers is False  # no broadcast before each forward
    wrapper(torch.randn(4, 3)).sum().backward()
    assert model.weight.grad is not None


def test_ddp_wraps_without_a_buffer_broadcast_per_forward_or_a_deprecation_warning():
    from _helpers import run_in_gloo_group

    run_in_gloo_group(_ddp_wrap_worker, 1)  # the harness's group: no destroy (torch 2.6's gloo hang)


def test_pooled_metrics_divide_the_sums_over_ranks(monkeypatch):
    """mean_over_ranks' `pooled` pairs: numerators and denominators are summed over the ranks in
    the same collective as the means, then divided (NaN where no rank has a row); one process
    divides its own."""
    assert distributed.mean_over_ranks({"m": 2.0}, pooled={"p": (3.0, 2.0), "none": (0.0, 0.0)}) == pytest.approx(
        {"m": 2.0, "p": 1.5, "none": float("nan")}, nan_ok=True
    )
    reduced = []

    def all_reduce(tensor, op=None, group=None):  # a second rank with m = 4, p = (1, 2), none = (0, 0)
        reduced.append(tensor.tolist())
        tensor += torch.tensor([1.0, 4.0, 0.0, 0.0, 1.0, 2.0], dtype=tensor.dtype)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "active", lambda group=None: True)
    monkeypatch.setattr(distributed, "_host_values_device", lambda: torch.device("cpu"))
    out = distributed.mean_over_ranks({"m": 2.0, "c": 1.0}, summed=("c",), pooled={"p": (3.0, 2.0), "none": (0.0, 0.0)})
    assert len(reduced) == 1  # one collective for all of them
    assert out == pytest.approx({"c": 2.0, "m": 3.0, "none": float("nan"), "p": 1.0}, nan_ok=True)


def _hung_destroy_worker(rank: int, world: int) -> None:
    import time

    dist.destroy_process_group = lambda *args, **kwargs: time.sleep(3600)  # pytorch/pytorch#75097's hang
    torch.distributed.distributed_c10d.destroy_process_group = dist.destroy_process_group


def test_a_spawned_group_ends_without_destroying_its_process_group():
    """The test harness's process groups: torch 2.6's gloo `destroy_process_group` deadlocks now
    and then (`_helpers._in_gloo_group` says how), so the harness's processes end after a
    barrier without it; a destroy that never returns is never reached."""
    import time

    from _helpers import run_in_gloo_group

    start = time.monotonic()
    run_in_gloo_group(_hung_destroy_worker, 2)
    assert time.monotonic() - start < 60


def test_teardown_leaves_gloo_the_gil_between_its_barrier_and_the_destroy(monkeypatch):
    """`distributed.teardown` sleeps (which releases the GIL) after the barrier and before the
    destroy: in torch before pytorch/pytorch#154976 the destroy holds the GIL while gloo's worker
    threads may still need it to release the barrier's prior work (docs/distributed.md)."""
    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *args, **kwargs: calls.append("destroy"))
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: calls.append(f"sleep {seconds}"))
    distributed.teardown()
    assert calls == ["barrier", f"sleep {distributed.GLOO_RELEASE_S}", "destroy"] and distributed.GLOO_RELEASE_S > 0
