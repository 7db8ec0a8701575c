"""Which regime a distillation setting is in, measured on the student's own rollouts.

DESIGN.md ("Demo settings and their summary") fixes four statistics, measured on the initial
student before any update:

    initial_reverse_kl_per_token   full-vocab KL(student || teacher), nats per response token
    mean_response_tokens           response tokens per rollout (EOS included)
    degenerate_rollout_fraction    rollouts that loop, run to the token limit without EOS, or
                                   break the task's answer format
    teacher_entropy_mean           teacher entropy, nats per response token

`rollout_health` classifies rollouts (the trainer logs it every step, too).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .data import Problem, is_well_formed
from .sampling import Rollouts, generate_rollouts
from .verifiers import Verifier, final_answer, score


def is_looping(text: str, *, span: int = 12, max_period: int = 6) -> bool:
    """True when the last `span` characters repeat with a period of at most `max_period`
    (e.g. "...=5=5=5=5=5=5"), the signature of a small model stuck in a loop."""
    tail = text[-span:]
    if len(tail) < span:
        return False
    return any(all(tail[i] == tail[i + period] for i in range(span - period)) for period in range(1, max_period + 1))


def rollout_health(rollouts: Rollouts, problems: list[Problem], eos_token_id: int,
                   verifier: Verifier = final_answer) -> dict[str, torch.Tensor]:
    """Per-rollout bool tensors [B]: `truncated` (no EOS within the token limit), `looping`
    (truncated with a periodic tail), `malformed` (breaks its task's answer format),
    `degenerate` (any of them); and `correct`, the float verifier score in [0, 1]."""
    truncated = ~(rollouts.response_ids == eos_token_id).any(dim=1).cpu()
    looping = torch.tensor([bool(t) and is_looping(text) for t, text in zip(truncated.tolist(), rollouts.texts)],
                           dtype=torch.bool)
    malformed = torch.tensor([not is_well_formed(text, p.teacher) for p, text in zip(problems, rollouts.texts)],
                             dtype=torch.bool)
    correct = torch.tensor([score(verifier, text, p.answer, p.row or {}) for p, text in zip(problems, rollouts.texts)],
                           dtype=torch.float32)
    return {"truncated": truncated, "looping": looping, "malformed": malformed,
            "degenerate": truncated | looping | malformed, "correct": correct}


def health_metrics(health: dict[str, torch.Tensor], prefix: str = "train/") -> dict[str, float]:
    return {f"{prefix}{name}_fraction": float(flags.float().mean()) if flags.numel() else 0.0
            for name, flags in health.items() if name != "correct"}


@torch.no_grad()
def measure_regime(trainer, problems: list[Problem], *, seed: int = 0, batch_size: Optional[int] = None) -> dict:
    """The regime statistics of `trainer`'s current student on `problems` (one temperature-`tau`
    rollout each, the trainer's sampling settings), scored by the routed teachers."""
    cfg = trainer.config
    torch.manual_seed(seed)
    batch_size = batch_size or max(cfg.rollouts_per_step, 1)
    totals = {"kl": 0.0, "teacher_entropy": 0.0, "student_entropy": 0.0, "tokens": 0, "rollouts": 0}
    flags: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollouts = generate_rollouts(trainer.student, trainer.tokenizer, [p.prompt for p in chunk],
                                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        _, student_entropy, _, teacher_entropy, reverse_kl = trainer.score(rollouts, [p.teacher for p in chunk])
        mask = rollouts.response_mask
        totals["kl"] += float(reverse_kl[mask].sum())
        totals["teacher_entropy"] += float(teacher_entropy[mask].sum())
        totals["student_entropy"] += float(student_entropy[mask].sum())
        totals["tokens"] += int(mask.sum())
        totals["rollouts"] += len(chunk)
        for name, value in rollout_health(rollouts, chunk, trainer.tokenizer.eos_token_id).items():
            flags.setdefault(name, []).append(value)
    tokens = max(totals["tokens"], 1)
    health = {name: torch.cat(values) for name, values in flags.items()}
    return {
        "initial_reverse_kl_per_token": totals["kl"] / tokens,
        "mean_response_tokens": totals["tokens"] / max(totals["rollouts"], 1),
        "degenerate_rollout_fraction": float(health["degenerate"].float().mean()),
        "teacher_entropy_mean": totals["teacher_entropy"] / tokens,
        # the parts of the degenerate fraction, and two more numbers that place the setting
        "truncated_rollout_fraction": float(health["truncated"].float().mean()),
        "looping_rollout_fraction": float(health["looping"].float().mean()),
        "malformed_rollout_fraction": float(health["malformed"].float().mean()),
        "student_entropy_mean": totals["student_entropy"] / tokens,
        "sampled_reward": float(health["correct"].float().mean()),
        "rollouts": totals["rollouts"],
    }


# A teacher "rejects" a sampled token it gives less than this probability.
REJECT_LOG_PROB = math.log(0.1)


@torch.no_grad()
def filter_diagnostics(keep: torch.Tensor, health: dict[str, torch.Tensor], response_mask: torch.Tensor,
                       teacher_log_prob: torch.Tensor, old_log_prob: torch.Tensor,
                       samples_per_prompt: int) -> dict[str, float]:
    """What the rollout filter drops, against what it keeps (the `diag/*` metrics): correctness,
    length, truncation, the prompt's difficulty (the mean reward of its group of rollouts, when
    there are several per prompt), the per-token advantage A_t = log pi_T - log pi_old, and where
    the first token the teacher rejects (p_T < 0.1) sits. Empty groups report NaN."""
    mask = response_mask.cpu()
    keep, has_tokens = keep.cpu(), mask.any(dim=1)
    advantage = torch.where(mask, (teacher_log_prob - old_log_prob).cpu(), 0.0)
    lengths = mask.sum(dim=1).float()
    rejected = (teacher_log_prob.cpu() < REJECT_LOG_PROB) & mask
    first_reject = torch.where(rejected.any(dim=1), rejected.float().argmax(dim=1).float(), float("nan"))
    correct = health["correct"].float()
    group_reward = correct.view(-1, samples_per_prompt).mean(dim=1).repeat_interleave(samples_per_prompt)
    out = {}
    for name, rows in (("kept", keep & has_tokens), ("dropped", ~keep & has_tokens)):
        count = int(rows.sum())
        mean = (lambda x: float(x[rows].float().mean())) if count else (lambda x: float("nan"))
        out[f"diag/{name}_rollouts"] = float(count)
        out[f"diag/{name}_correct"] = mean(correct)
        out[f"diag/{name}_length"] = mean(lengths)
        out[f"diag/{name}_truncated"] = mean(health["truncated"])
        out[f"diag/{name}_advantage_per_token"] = float(advantage[rows].sum() / lengths[rows].sum()) if count \
            else float("nan")
        out[f"diag/{name}_with_rejected_token"] = mean(rejected.any(dim=1))
        reject_rows = rows & ~first_reject.isnan()
        out[f"diag/{name}_first_rejected_position"] = float(first_reject[reject_rows].mean()) \
            if bool(reject_rows.any()) else float("nan")
        if samples_per_prompt > 1:
            out[f"diag/{name}_prompt_group_reward"] = mean(group_reward)
    return out


@torch.no_grad()
def continuation_accuracy(teacher, student, tokenizer, problems: list[Problem], *, max_new_tokens: int,
                          temperature: float = 1.0, cut: float = 0.5, seed: int = 0, batch_size: int = 256,
                          verifier: Verifier = final_answer) -> dict:
    """How reliable the teacher is off its own distribution, measured directly: the teacher's
    greedy accuracy when it must continue a prefix of a sampled rollout (the first `cut` of its
    response tokens), for prefixes of the student's rollouts and, as the control, of its own.

    A teacher whose token-level signal can be trusted on the student's rollouts solves about as
    many problems from the student's prefixes as from its own, minus the prefixes that are
    already wrong; `..._from_correct_student_prefixes` leaves those out (prefixes of student
    rollouts that end correct). FiRe's premise is a teacher for which these are much lower."""
    torch.manual_seed(seed)
    out = {}
    for name, sampler, sampled_by in (("student_prefixes", student, "student"), ("own_prefixes", teacher, "teacher")):
        solved, rollouts_correct = [], []
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            rollouts = generate_rollouts(sampler, tokenizer, [p.prompt for p in chunk],
                                         max_new_tokens=max_new_tokens, temperature=temperature)
            prefixes = []
            for ids, mask in zip(rollouts.response_ids, rollouts.response_mask):
                body = ids[mask & (ids != tokenizer.eos_token_id)]
                prefixes.append(tokenizer.decode(body[: int(len(body) * cut)].tolist()))
            continued = generate_rollouts(teacher, tokenizer, [p.prompt + pre for p, pre in zip(chunk, prefixes)],
                                          max_new_tokens=max_new_tokens, do_sample=False)
            solved += [score(verifier, pre + text, p.answer, p.row or {})
                       for p, pre, text in zip(chunk, prefixes, continued.texts)]
            rollouts_correct += [score(verifier, text, p.answer, p.row or {}) for p, text in zip(chunk, rollouts.texts)]
        out[f"teacher_accuracy_from_{name}"] = sum(solved) / max(len(solved), 1)
        out[f"{sampled_by}_rollouts_correct"] = sum(rollouts_correct) / max(len(rollouts_correct), 1)
        from_correct = [s for s, c in zip(solved, rollouts_correct) if c >= 1.0]
        out[f"teacher_accuracy_from_correct_{name}"] = \
            sum(from_correct) / len(from_correct) if from_correct else float("nan")
    out["prefix_cut"] = cut
    return out
