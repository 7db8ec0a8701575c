"""Rollout health: what the trainer logs about its rollouts beside the loss.

`rollout_health` classifies each rollout: truncated (no EOS within the token limit), looping,
malformed (breaks its task's answer format, where the caller gives formats: the demo's tasks
have them, `ANSWER_FORMATS`), correct (by the verifier).
`filter_diagnostics` says what the FiRe filter dropped: how many of the dropped rollouts were
correct, degenerate, or ones the teacher would reject.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import torch

from fire_opd.train.data import Problem
from fire_opd.train.rollouts import Rollouts
from fire_opd.train.verifiers import Verifier, final_answer, score

# A well-formed completion of each demo task (EOS removed), by the demo's teacher key: anything
# else is format drift. Only the demo passes these: a user's teacher called "chain" is not the demo's.
_EXPR = r"-?\d+(?:[+-]\d+)*"


ANSWER_FORMATS = {
    "arith": re.compile(r"^-?\d+[+-]\d+=-?\d+$"),
    "reverse": re.compile(r"^\d+$"),
    "chain": re.compile(rf"^{_EXPR}(?:[=,]{_EXPR})*=-?\d+$"),
}


def is_well_formed(completion: str, task: Optional[str], formats: Mapping[str, re.Pattern] = ANSWER_FORMATS) -> bool:
    """Whether a completion follows its task's answer format (True for tasks without one)."""
    pattern = formats.get(task or "")
    return pattern is None or bool(pattern.match(completion.strip()))


def is_looping(text: str, *, span: int = 12, max_period: int = 6) -> bool:
    """True when the last `span` characters repeat with a period of at most `max_period`
    (e.g. "...=5=5=5=5=5=5"), the signature of a small model stuck in a loop."""
    tail = text[-span:]
    if len(tail) < span:
        return False
    return any(all(tail[i] == tail[i + period] for i in range(span - period)) for period in range(1, max_period + 1))


def rollout_health(
    rollouts: Rollouts,
    problems: list[Problem],
    eos_token_id: int,
    verifier: Verifier = final_answer,
    answer_formats: Optional[Mapping[str, re.Pattern]] = None,
) -> dict[str, torch.Tensor]:
    """Per-rollout bool tensors [B]: `truncated` (no EOS within the token limit), `looping`
    (truncated with a periodic tail), `malformed` (breaks the answer format `answer_formats`
    gives its teacher key; all False without formats), `degenerate` (any of them); and `correct`,
    the float verifier score in [0, 1]."""
    truncated = ~(rollouts.response_ids == eos_token_id).any(dim=1).cpu()
    looping = torch.tensor(
        [bool(t) and is_looping(text) for t, text in zip(truncated.tolist(), rollouts.texts)], dtype=torch.bool
    )
    malformed = torch.tensor(
        [not is_well_formed(text, p.teacher, answer_formats or {}) for p, text in zip(problems, rollouts.texts)],
        dtype=torch.bool,
    )
    correct = torch.tensor(
        [score(verifier, text, p.answer, p.row or {}) for p, text in zip(problems, rollouts.texts)], dtype=torch.float32
    )
    return {
        "truncated": truncated,
        "looping": looping,
        "malformed": malformed,
        "degenerate": truncated | looping | malformed,
        "correct": correct,
    }


def health_metrics(health: dict[str, torch.Tensor], prefix: str = "train/") -> dict[str, float]:
    return {
        f"{prefix}{name}_fraction": float(flags.float().mean()) if flags.numel() else 0.0
        for name, flags in health.items()
        if name != "correct"
    }


# A teacher "rejects" a sampled token it gives less than this probability.
REJECT_LOG_PROB = math.log(0.1)


@torch.no_grad()
def filter_diagnostics(
    kept_rollouts: torch.Tensor,
    health: dict[str, torch.Tensor],
    response_mask: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    samples_per_prompt: int,
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """What the rollout filter drops, against what it keeps (the `diag/*` metrics): correctness,
    length, truncation, the prompt's difficulty (the mean reward of its group of rollouts, when
    there are several per prompt), the per-token advantage A_t = log pi_T - log pi_old, and where
    the first token the teacher rejects (p_T < 0.1) sits.

    Returns (counts, pooled) over this process's rows: the kept and dropped rollout counts (to be
    summed over processes), and every mean as (n m, n), this process's mean m over its n rows,
    weighted so that processes that kept or dropped different numbers pool into the mean over
    all their rows (`distributed.mean_over_ranks`'s `pooled`; NaN where no process has a row)."""
    mask = response_mask.cpu()
    kept_rollouts, has_tokens = kept_rollouts.cpu(), mask.any(dim=1)
    advantage = torch.where(mask, (teacher_log_prob - old_log_prob).cpu(), 0.0)
    lengths = mask.sum(dim=1).float()
    rejected = (teacher_log_prob.cpu() < REJECT_LOG_PROB) & mask
    first_reject = torch.where(rejected.any(dim=1), rejected.float().argmax(dim=1).float(), float("nan"))
    correct = health["correct"].float()
    group_reward = correct.view(-1, samples_per_prompt).mean(dim=1).repeat_interleave(samples_per_prompt)

    def weighted_mean(x: torch.Tensor, rows: torch.Tensor) -> tuple[float, float]:
        n = int(rows.sum())
        return (float(x[rows].float().mean()) * n, float(n)) if n else (0.0, 0.0)

    counts, pooled = {}, {}
    for name, rows in (("kept", kept_rollouts & has_tokens), ("dropped", ~kept_rollouts & has_tokens)):
        counts[f"diag/{name}_rollouts"] = float(rows.sum())
        pooled[f"diag/{name}_correct"] = weighted_mean(correct, rows)
        pooled[f"diag/{name}_length"] = weighted_mean(lengths, rows)
        pooled[f"diag/{name}_truncated"] = weighted_mean(health["truncated"], rows)
        tokens = float(lengths[rows].sum())  # the advantage's mean is over tokens, not rollouts
        pooled[f"diag/{name}_advantage_per_token"] = (
            (float(advantage[rows].sum() / lengths[rows].sum()) * tokens, tokens) if tokens else (0.0, 0.0)
        )
        pooled[f"diag/{name}_with_rejected_token"] = weighted_mean(rejected.any(dim=1), rows)
        pooled[f"diag/{name}_first_rejected_position"] = weighted_mean(first_reject, rows & ~first_reject.isnan())
        if samples_per_prompt > 1:
            pooled[f"diag/{name}_prompt_group_reward"] = weighted_mean(group_reward, rows)
    return counts, pooled
