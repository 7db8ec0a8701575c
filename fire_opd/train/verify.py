"""`fire.filter_mode: verified`: is the teacher still reliable after the student's mistake?

For each rollout the filter flags, the first divergence token t* is the first sampled token the
teacher gives less than `fire.divergence_prob`. The rollout's teacher continues greedily from the
prompt and the student's response up to and including t*, and the run's verifier scores the
result (the student's prefix and the teacher's continuation). A teacher that still reaches a
correct answer is reliable there: the rollout stays whole in the loss. Otherwise
`compute_fire_advantages` keeps only its tokens up to t* (`filter_mode: truncate`'s cut).

This costs a greedy continuation of each flagged rollout with a divergence token, all of a
teacher's in one generate call (or in calls of `rows_per_call` rows, the sampler's memory bound),
reported per step (`fire/verified_rollouts`, `fire/verify_tokens`, `time/verify_s`). Each process
verifies its own rollouts with its own (replicated) teachers, so the decisions do not depend on the
process count.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from fire_kernels import TeacherStudentStats
from fire_opd.algorithm.options import FireOptions
from fire_opd.algorithm.selection import compute_fire_advantages, first_divergence
from fire_opd.parallel import distributed
from fire_opd.train.data import Problem
from fire_opd.train.rollouts import Rollouts, greedy_continuations
from fire_opd.train.verifiers import Verifier, score


def flagged_rollouts(
    scores: TeacherStudentStats, mask: torch.Tensor, fire: FireOptions, group_ids: torch.Tensor
) -> torch.Tensor:
    """[B] bool: the rollouts the filter would drop (its threshold over every process's rows)."""
    assert scores.teacher_log_prob is not None and scores.teacher_entropy is not None
    drop = compute_fire_advantages(
        scores.student_log_prob, scores.teacher_log_prob, scores.student_entropy, scores.teacher_entropy, mask,
        fire=replace(fire, filter_mode="drop"), group_ids=group_ids,
    )  # fmt: skip
    return mask.any(dim=-1) & ~drop.kept_rollouts


@torch.no_grad()
def verify_flagged(
    rollouts: Rollouts,
    problems: list[Problem],
    scores: TeacherStudentStats,
    *,
    fire: FireOptions,
    group_ids: torch.Tensor,
    teachers: dict[str, torch.nn.Module],
    routes: dict[str, torch.Tensor],
    tokenizer,
    verifier: Verifier,
    max_new_tokens: int,
    rows_per_call: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(teacher_reliable [B] bool, metrics): whether each flagged rollout's teacher, continuing
    from the student's prefix through its first divergence token, reaches a correct answer
    (True for every other rollout). `routes`: teacher name -> this process's rows;
    `max_new_tokens`: the response limit, which the prefix and continuation share;
    `rows_per_call`: the most rollouts one generate call continues (0: all of a teacher's)."""
    start = time.perf_counter()
    mask = rollouts.response_mask
    assert scores.teacher_log_prob is not None
    flagged = flagged_rollouts(scores, mask, fire, group_ids)
    cut = first_divergence(scores.teacher_log_prob, mask, fire.divergence_prob)
    to_verify = flagged & (cut >= 0)
    reliable = torch.ones_like(flagged)
    generated = 0
    for name, routed in routes.items():
        rows = routed[to_verify[routed]].tolist()
        step = rows_per_call or max(len(rows), 1)
        for first in range(0, len(rows), step):
            chunk = rows[first : first + step]
            prefixes = [rollouts.response_ids[i, : int(cut[i]) + 1] for i in chunk]
            prompts = [rollouts.prompt_ids[i][rollouts.prompt_mask[i].bool()] for i in chunk]
            # each continuation gets the budget the sampler had left after the prefix
            continuations = greedy_continuations(
                teachers[name], tokenizer, [torch.cat(pair) for pair in zip(prompts, prefixes)],
                [max_new_tokens - len(prefix) for prefix in prefixes],
            )  # fmt: skip
            for i, prefix, continuation in zip(chunk, prefixes, continuations):
                generated += len(continuation)
                ids = torch.cat([prefix, continuation.to(prefix.device)])
                text = tokenizer.decode(ids[ids != tokenizer.eos_token_id].tolist())
                problem = problems[i]
                reliable[i] = score(verifier, text, problem.answer, problem.row or {}) >= 0.5
    local = {
        "fire/verified_rollouts": float(to_verify.sum()),
        "fire/verified_reliable": float((to_verify & reliable).sum()),
        "fire/verify_tokens": float(generated),
    }
    totals = distributed.mean_over_ranks(local, summed=tuple(local))
    totals["fire/verified_reliable_ratio"] = totals["fire/verified_reliable"] / max(
        totals["fire/verified_rollouts"], 1.0
    )
    totals["time/verify_s"] = time.perf_counter() - start
    return reliable, totals
