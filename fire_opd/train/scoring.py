"""Step 2 of the loop: score every sampled token, without gradient and without logits.

Each rollout goes to its teacher (the prompt's "teacher" key, or the default); per micro-batch of
one teacher, the teacher's forward gives its hidden states and head, and the student's forward one
fused sweep over both lm_heads: the student's log-prob (the sampler's, log pi_old) and entropy,
the teacher's log-prob and entropy, and the full-vocab reverse KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fire_kernels import TeacherStudentStats
from fire_opd.algorithm.routing import scatter_rows
from fire_opd.parallel.parallelism import MicroBatch
from fire_opd.train.forwards import StudentForward, TeacherForward
from fire_opd.train.rollouts import Rollouts


@dataclass
class TeacherPlan:
    """Which teacher reads which of this process's rollouts, and in which micro-batches: made once
    per step (one collective under torchrun) for scoring and the dense objective's update."""

    routes: dict[str, torch.Tensor]  # teacher name -> this process's row indices
    micro_batches: list[MicroBatch]  # at most `size` rows each, one teacher each, teachers in name order


@torch.no_grad()
def score_rollouts(
    rollouts: Rollouts, plan: TeacherPlan, *, student: StudentForward, teachers: dict[str, TeacherForward]
) -> TeacherStudentStats:
    """Per-token [B, T] statistics of this process's rollouts, each row by its own teacher.

    `divergence` is the full-vocab reverse KL(student || teacher). `student` is the module itself,
    not its DDP wrapper: scoring takes no gradient, and under FSDP2 the module is the wrapper."""
    per_teacher: dict[str, list[TeacherStudentStats]] = {}
    for batch in plan.micro_batches:
        assert batch.teacher is not None  # routed rows
        tokens = rollouts.tokens(batch.rows)
        stats = student(tokens, teachers[batch.teacher](tokens))
        if not batch.padding:  # only there to keep every process's collectives in step
            per_teacher.setdefault(batch.teacher, []).append(stats)
    columns = {name: TeacherStudentStats._make(map(torch.cat, zip(*parts))) for name, parts in per_teacher.items()}
    stats = scatter_rows(columns, plan.routes, batch_size=len(rollouts))
    assert isinstance(stats, TeacherStudentStats)
    return stats
