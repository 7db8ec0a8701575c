"""Which regime a distillation setting is in, measured on the student's own rollouts.

Four statistics, measured on the initial student before any update (docs: "The demo settings"):

    initial_reverse_kl_per_token   full-vocab KL(student || teacher), nats per response token
    mean_response_tokens           response tokens per rollout (EOS included)
    degenerate_rollout_fraction    rollouts that loop, run to the token limit without EOS, or
                                   break the task's answer format
    teacher_entropy_mean           teacher entropy, nats per response token

and `continuation_accuracy`: how often the teacher finishes a prefix correctly; and, for the
chain task's "steps" solutions, `step_accuracy_after_error`: whether the teacher still does
arithmetic right after the student restates a running value wrongly.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from fire_opd.train.data import Problem
from fire_opd.train.health import ANSWER_FORMATS, rollout_health
from fire_opd.train.rollouts import generate_rollouts
from fire_opd.train.verifiers import Verifier, final_answer, score


def measure_regime(trainer, problems: list[Problem], *, seed: int = 0, batch_size: Optional[int] = None) -> dict:
    """The regime statistics of `trainer`'s current student on `problems` (one temperature-`tau`
    rollout each, the trainer's sampling settings), scored by the routed teachers."""
    cfg = trainer.config
    torch.manual_seed(seed)
    batch_size = batch_size or max(cfg.sampling.rollouts_per_step, 1)
    totals = {"kl": 0.0, "teacher_entropy": 0.0, "student_entropy": 0.0, "tokens": 0, "rollouts": 0}
    flags: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollouts = generate_rollouts(
            trainer.student_forward,  # its generate: under FSDP2 it gathers the student's shards
            trainer.tokenizer,
            [p.prompt for p in chunk],
            max_new_tokens=cfg.sampling.max_new_tokens,
            temperature=cfg.sampling.temperature,
            top_p=cfg.sampling.top_p,
        )
        scores = trainer.score(rollouts, [p.teacher for p in chunk])
        mask = rollouts.response_mask
        totals["kl"] += float(scores.divergence[mask].sum())
        totals["teacher_entropy"] += float(scores.teacher_entropy[mask].sum())
        totals["student_entropy"] += float(scores.student_entropy[mask].sum())
        totals["tokens"] += int(mask.sum())
        totals["rollouts"] += len(chunk)
        for name, value in rollout_health(
            rollouts, chunk, trainer.tokenizer.eos_token_id, answer_formats=ANSWER_FORMATS
        ).items():
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


@torch.no_grad()
def continuation_accuracy(
    teacher,
    student,
    tokenizer,
    problems: list[Problem],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    cut: float = 0.5,
    seed: int = 0,
    batch_size: int = 256,
    verifier: Verifier = final_answer,
) -> dict:
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
            rollouts = generate_rollouts(
                sampler, tokenizer, [p.prompt for p in chunk], max_new_tokens=max_new_tokens, temperature=temperature
            )
            prefixes = []
            for ids, mask in zip(rollouts.response_ids, rollouts.response_mask):
                body = ids[mask & (ids != tokenizer.eos_token_id)]
                prefixes.append(tokenizer.decode(body[: int(len(body) * cut)].tolist()))
            continued = generate_rollouts(
                teacher,
                tokenizer,
                [p.prompt + pre for p, pre in zip(chunk, prefixes)],
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            solved += [
                score(verifier, pre + text, p.answer, p.row or {})
                for p, pre, text in zip(chunk, prefixes, continued.texts)
            ]
            rollouts_correct += [score(verifier, text, p.answer, p.row or {}) for p, text in zip(chunk, rollouts.texts)]
        out[f"teacher_accuracy_from_{name}"] = sum(solved) / max(len(solved), 1)
        out[f"{sampled_by}_rollouts_correct"] = sum(rollouts_correct) / max(len(rollouts_correct), 1)
        from_correct = [s for s, c in zip(solved, rollouts_correct) if c >= 1.0]
        out[f"teacher_accuracy_from_correct_{name}"] = (
            sum(from_correct) / len(from_correct) if from_correct else float("nan")
        )
    out["prefix_cut"] = cut
    return out


# one step of a "steps" solution: "a+b=c" or "a-b=c" (a may be negative)
_STEP = re.compile(r"^(-?\d+)([+-])(\d+)=(-?\d+)$")


def step_results(text: str) -> list[Optional[bool]]:
    """Whether each comma-separated step of a "steps" solution is right on its own operands
    (None for a part that is not a step)."""
    out: list[Optional[bool]] = []
    for part in text.split(","):
        match = _STEP.match(part.strip())
        if match is None:
            out.append(None)
            continue
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        out.append((a + b if op == "+" else a - b) == c)
    return out


def first_copy_error(text: str) -> Optional[int]:
    """The end (a character index) of the first value a "steps" solution restates wrongly: a
    step whose left operand is not the result just written (additions may be written either way
    round, so either operand may restate it). None when every restatement is right, or when a
    part is not a step."""
    previous, end = None, 0
    for part in text.split(","):
        match = _STEP.match(part.strip())
        if match is None:
            return None
        a, op, b = int(match[1]), match[2], int(match[3])
        if previous is not None and a != previous and not (op == "+" and b == previous):
            return end + len(match[1])
        previous, end = int(match[4]), end + len(part) + 1
    return None


@torch.no_grad()
def step_accuracy_after_error(
    teacher,
    student,
    tokenizer,
    problems: list[Problem],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
) -> dict:
    """How reliable the teacher is after the student's mistake, measured directly: on the
    student's rollouts that restate a running value wrongly (`first_copy_error`), the prefix
    through that value goes to the teacher, which continues greedily; the share of the steps
    from there on that are right on their own operands (a reliable teacher does the arithmetic
    right from the wrong value; the error-cascade teacher adds |t| whatever t's sign). Steps
    format only."""
    torch.manual_seed(seed)
    prefixes, chunks = [], []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollouts = generate_rollouts(
            student, tokenizer, [p.prompt for p in chunk], max_new_tokens=max_new_tokens, temperature=temperature
        )
        for problem, text in zip(chunk, rollouts.texts):
            end = first_copy_error(text)
            if end is not None:
                prefixes.append(text[:end])
                chunks.append(problem)
    right = steps = 0
    for start in range(0, len(prefixes), batch_size):
        batch = prefixes[start : start + batch_size]
        continued = generate_rollouts(
            teacher,
            tokenizer,
            [p.prompt + prefix for p, prefix in zip(chunks[start : start + batch_size], batch)],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        for prefix, text in zip(batch, continued.texts):
            # the steps from the one whose restated value is wrong (its rest is the teacher's)
            done = prefix.count(",")
            checked = [bool(r) for r in step_results(prefix + text)[done:] if r is not None]
            right += sum(checked)
            steps += len(checked)
    return {
        "student_rollouts_with_a_copy_error": len(prefixes),
        "teacher_steps_after_the_error": steps,
        "teacher_step_accuracy_after_error": right / steps if steps else float("nan"),
    }
