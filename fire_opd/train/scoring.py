"""Step 2 of the loop: score every sampled token, without gradient and without logits.

Each rollout goes to its teacher (the prompt's "teacher" key, or the default); per teacher, one
fused sweep over both lm_heads gives the student's log-prob (the sampler's, log pi_old) and
entropy, the teacher's log-prob and entropy, and the full-vocab reverse KL.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch

from fire_kernels import TeacherStudentStats
from fire_opd.algorithm.routing import route_rows, scatter_rows
from fire_opd.ops.heads import lm_head, response_hidden_states
from fire_opd.ops.loss_from_hidden import response_token_stats
from fire_opd.parallel.parallelism import MicroBatch, Parallelism
from fire_opd.train.rollouts import Rollouts


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """bf16 autocast for a float32 model on CUDA (the kernels take the bf16 hidden states)."""
    if device.type == "cuda" and dtype == "float32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def teacher_plan(
    routes: dict[str, torch.Tensor], teachers: dict[str, torch.nn.Module], parallel: Parallelism, size: int
) -> list[MicroBatch]:
    """The step's micro-batches of at most `size` rows, one teacher each, teachers in name order:
    what scoring runs, and the dense objective's update too (one plan, one collective, per step)."""
    return parallel.plan_micro_batches(routes, size, order=sorted(teachers))


@torch.no_grad()
def score_rollouts(
    rollouts: Rollouts,
    keys: list[Optional[str]],
    *,
    student: torch.nn.Module,
    teachers: dict[str, torch.nn.Module],
    default_teacher: Optional[str],
    parallel: Parallelism,
    micro_batch_size: int,
    temperature: float,
    backend: str,
    model_dtype: str,
    vocab_size: Optional[int] = None,
    plan: Optional[list[MicroBatch]] = None,
) -> TeacherStudentStats:
    """Per-token [B, T] statistics of this process's rollouts (`keys`: each row's teacher key).

    `divergence` is the full-vocab reverse KL(student || teacher). The student's forward runs
    inside its FSDP wrapper when it has one (the lm_head is gathered there), itself inside the
    teacher's when the teacher is sharded. `plan`: the step's micro-batches by teacher
    (`teacher_plan`), made here when not given."""
    routes = route_rows(keys, teachers, default=default_teacher)
    ids, attn, mask = rollouts.input_ids, rollouts.attention_mask, rollouts.response_mask
    per_teacher: dict = {}
    for batch in plan if plan is not None else teacher_plan(routes, teachers, parallel, micro_batch_size):
        assert batch.teacher is not None  # routed rows
        teacher, rows = teachers[batch.teacher], batch.rows

        def student_stats(teacher_hidden, teacher=teacher, rows=rows):
            with autocast(parallel.device, model_dtype):
                hidden = response_hidden_states(student, ids[rows], attn[rows], rollouts.prompt_len)
            return response_token_stats(
                hidden,
                lm_head(student).to(hidden.dtype),
                rollouts.response_ids[rows],
                mask[rows],
                teacher_hidden,
                lm_head(teacher).to(teacher_hidden.dtype),
                temperature=temperature,
                divergence="reverse_kl",
                backend=backend,
                vocab_process_group=parallel.vocab_group,
                vocab_size=vocab_size,
            )

        def with_teacher(teacher=teacher, rows=rows, student_stats=student_stats):
            with autocast(parallel.device, model_dtype):
                teacher_hidden = response_hidden_states(teacher, ids[rows], attn[rows], rollouts.prompt_len)
            return parallel.through_student(student, student_stats, teacher_hidden, fsdp_only=True)

        stats = parallel.through_teacher(batch.teacher, teacher, with_teacher)
        if not batch.padding:
            per_teacher.setdefault(batch.teacher, []).append(stats)
    columns = {name: TeacherStudentStats._make(map(torch.cat, zip(*parts))) for name, parts in per_teacher.items()}
    stats = scatter_rows(columns, routes, batch_size=len(keys))
    assert isinstance(stats, TeacherStudentStats)
    return stats
