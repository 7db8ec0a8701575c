"""One object that knows how the processes of a run share its work, and every factor that follows.

Under torchrun a step's rollouts are split over K processes. The trainer's arithmetic stays that
of one process holding the whole batch because of the factors collected here, and nowhere else:

- loss scale: each process normalizes its loss by the batch-wide count (token-mean: all kept
  tokens of all processes), and DDP / FSDP *average* gradients over processes, so each backward
  is multiplied by K (`backward_scale`); the released code's per-micro-batch statistics average
  micro-batches over all processes instead (`micro_batch_scale`);
- gradient sync: only the last micro-batch of a step synchronizes (`gradient_sync`);
- clipping norm: over every process's gradient; vocabulary-sharded heads are divided by K first
  (each process's head loss is every process's) (`clip_grad_norm`);
- reported loss: under parallel.vocab each process's loss value is the whole batch's, so it
  counts 1 / K towards the step's loss (`reported_loss_divisor`);
- who generates and who logs: rank 0 logs, evaluates and writes checkpoints; under FSDP or
  parallel.vocab every process takes part in generation (its collectives) (`generates_for_eval`,
  `synced_generation`).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from fire_opd.parallel import distributed, sharded_head

Teacher = TypeVar("Teacher", bound=Optional[str])  # a teacher's name, or None for rows of any teacher


@dataclass
class MicroBatch:
    """Rows of the step's rollouts that one forward / backward takes."""

    teacher: Optional[str]  # the teacher whose distribution these rows need (None: any)
    rows: torch.Tensor  # [rows] indices into this process's rollouts
    padding: bool  # only there to keep collectives in step: contributes no token


def plan_micro_batches(
    routes: Mapping[Teacher, torch.Tensor],
    size: int,
    order: Optional[Sequence[Teacher]] = None,
    *,
    counts: Optional[Callable[[list[int]], list[int]]] = None,
) -> list[MicroBatch]:
    """Micro-batches of at most `size` rows of each route (teacher -> row indices), route by route
    in `order`. `counts` maps this process's micro-batch count per route to the count every
    process runs (the maximum over processes); the extra micro-batches repeat some rows of this
    process and are marked padding. A single process (or the TRL integration) passes none."""
    names = list(routes) if order is None else list(order)
    local = {name: list(routes[name].split(size)) if name in routes else [] for name in names}
    own = [len(local[name]) for name in names]
    totals = counts(own) if counts is not None else own
    some_rows = next((chunk for chunks in local.values() for chunk in chunks), None)
    plan = []
    for name, total in zip(names, totals):
        for i in range(total):
            padding = i >= len(local[name])
            rows = local[name][i] if not padding else (local[name] or [some_rows])[0]
            assert rows is not None  # a process with no rows at all pads with nothing to repeat
            plan.append(MicroBatch(name, rows, padding))
    return plan


def averaged_gradient_scale(world_size: int) -> int:
    """The factor of a per-process loss normalized by the batch-wide count when DDP / FSDP (or
    accelerate) average the K processes' gradients: K, so that the average is the whole batch's
    gradient. The one place this factor is defined: the trainer's backward and the TRL
    integration's loss normalizer both take it from here."""
    return world_size


def _model_of(forward_module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model a forward module (`fire_opd.train.forwards`) runs."""
    model = forward_module.model
    assert isinstance(model, torch.nn.Module), f"{type(forward_module).__name__}.model is not a module"
    return model


@dataclass
class Parallelism:
    """This process's place in the run: rank, world size, device, the model wrappers."""

    rank: int
    world_size: int
    device: torch.device
    vocab_group: Optional[Any] = None  # the process group of vocabulary-sharded lm_heads (parallel.vocab)
    wrapper: Optional[torch.nn.Module] = None  # the student's DDP / FSDP2 wrapper; None in one process
    teacher_wrappers: dict[str, Any] = field(default_factory=dict)  # FSDP2-sharded teachers

    @classmethod
    def start(cls, device: torch.device, *, vocab: bool) -> Parallelism:
        """Join the process group torchrun set up (nothing to join in a single process)."""
        rank, world_size, device = distributed.setup(device)
        vocab_group = dist.group.WORLD if vocab and distributed.active() else None
        return cls(rank, world_size, device, vocab_group)

    def wrap(
        self, student: torch.nn.Module, teachers: Mapping[str, torch.nn.Module], *, mode: str, teacher_mode: str
    ) -> None:
        """Wrap the step's forward modules once (torchrun only): DDP or FSDP2 around the student's,
        FSDP2 around the teachers' that ask for it. Each module holds its Hugging Face model as
        `.model`; FSDP2 shards that model's decoder layers, then the module (the root, whose
        forward gathers the embeddings and the lm_head), and registers the student module's
        `generate` as a forward method, so sampling gathers them too."""
        model = _model_of(student)
        sharded = [f"model.{name}" for name in sharded_head.sharded_parameter_names(model)]  # DDP leaves them
        self.wrapper = distributed.wrap(
            student, self.device, mode, ignore=sharded, layers_of=model, forward_methods=("generate",)
        )
        self.teacher_wrappers = {
            name: wrapper
            for name, teacher in teachers.items()
            if (wrapper := distributed.wrap_teacher(teacher, teacher_mode, layers_of=_model_of(teacher))) is not None
        }

    def release(self) -> None:
        """Drop the wrappers (DDP's reducer) while the process group still lives: a reducer freed
        after it, at interpreter exit, can deadlock in gloo's destructor (its thread waits for
        the GIL the exiting main thread holds). The end of a run calls it before `teardown`."""
        self.wrapper = None
        self.teacher_wrappers = {}
        gc.collect()

    # ------------------------------------------------------------------ roles

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.wrapper is not None and distributed.is_fsdp(self.wrapper)

    @property
    def generates_for_eval(self) -> bool:
        """Whether this process runs evaluation's generation: rank 0, or every process when
        generation is itself collective (FSDP gathers, sharded lm_heads)."""
        return self.is_main or self.fsdp or self.vocab_group is not None

    @property
    def synced_generation(self) -> Optional[bool]:
        """A sharded lm_head makes every decode step a collective: all processes decode until the
        last one is done (None: `generate` decides, as it does for FSDP)."""
        return True if self.vocab_group is not None else None

    def my_prompts(self, prompts_per_step: int, chunk_prompts: int) -> tuple[range, int]:
        """(the step's prompts this process samples, prompts per `generate` call)."""
        return distributed.my_prompts(prompts_per_step, chunk_prompts, self.rank, self.world_size)

    # ------------------------------------------------------------------ the world-size factors

    @property
    def backward_scale(self) -> int:
        """K when DDP / FSDP average the gradients of K processes, whose losses are each normalized
        by the batch-wide count: the product is the whole batch's gradient."""
        return averaged_gradient_scale(self.world_size) if self.wrapper is not None else 1

    def micro_batch_scale(self, micro_batches: int) -> float:
        """The weight of one micro-batch's own-normalized loss when statistics are per micro-batch:
        each process's mean over its `micro_batches`, averaged over the processes, as the released
        code's gradient accumulation under DDP does (the mean over all processes' micro-batches
        when each has as many: one teacher, or the sampled objective)."""
        return 1 / (micro_batches * self.world_size)

    @property
    def reported_loss_divisor(self) -> int:
        """Under parallel.vocab every process's loss is the whole batch's: each counts 1 / K."""
        return self.world_size if self.vocab_group is not None else 1

    @contextmanager
    def gradient_sync(self, index: int, count: int) -> Iterator[None]:
        """Synchronize gradients on the last micro-batch of a step only: the others accumulate
        locally (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`)."""
        wrapper: Any = self.wrapper  # DDP or FSDP2's module: their own sync switches
        if wrapper is None or index == count - 1:
            yield
        elif distributed.is_fsdp(wrapper):
            wrapper.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapper.set_requires_gradient_sync(True)
        else:
            with wrapper.no_sync():
                yield

    def clip_grad_norm(self, student: torch.nn.Module, max_norm: float) -> float:
        """Clip the student's gradients to `max_norm` over all processes; returns their norm before
        clipping."""
        heads = sharded_head.sharded_parameters(student)
        if self.wrapper is not None:
            distributed.count_gradients(student.parameters(), skip=heads)
        if self.vocab_group is None:
            return float(torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm))
        # each lm_head shard holds the whole batch's gradient for its rows, times the loss's K
        for param in heads:
            if param.grad is not None:
                param.grad.div_(self.world_size)
        return sharded_head.clip_grad_norm(student, max_norm)

    # ------------------------------------------------------------------ the micro-batch plan

    def plan_micro_batches(
        self, routes: Mapping[Teacher, torch.Tensor], size: int, order: Optional[Sequence[Teacher]] = None
    ) -> list[MicroBatch]:
        """Micro-batches of at most `size` rows, teacher by teacher in one order on every process.

        routes: teacher (or None) -> this process's row indices. Under torchrun every process
        runs as many micro-batches of each teacher as the process with the most (DDP syncs once,
        FSDP gathers the same shards, vocab_parallel gathers the same tokens); the extra ones
        repeat some rows of this process and are marked padding."""
        routes = {name: rows.to(self.device) for name, rows in routes.items()}
        in_step = self.wrapper is not None or bool(self.teacher_wrappers)  # collectives inside each forward
        return plan_micro_batches(routes, size, order, counts=distributed.max_over_ranks_each if in_step else None)
