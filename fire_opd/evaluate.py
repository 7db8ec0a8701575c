"""Held-out evaluation: greedy decoding (pass@1) scored by the answer verifier."""

from __future__ import annotations

from typing import Iterable

from .data import Problem, is_correct
from .sampling import generate_rollouts


def accuracy(model, tokenizer, problems: Iterable[Problem], *, batch_size: int = 256, max_new_tokens: int = 12) -> float:
    """Fraction of problems whose greedy completion has the right final answer (0.0 if none)."""
    problems = list(problems)
    if not problems:
        return 0.0
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollouts = generate_rollouts(model, tokenizer, [p.prompt for p in chunk], max_new_tokens=max_new_tokens,
                                     do_sample=False)
        correct += sum(is_correct(text, p.answer) for text, p in zip(rollouts.texts, chunk))
    return correct / len(problems)


def accuracy_by_teacher(model, tokenizer, problems: Iterable[Problem], **kwargs) -> dict[str, float]:
    """Accuracy overall ("all") and per routing key."""
    problems = list(problems)
    keys = sorted({p.teacher for p in problems if p.teacher is not None})
    scores = {"all": accuracy(model, tokenizer, problems, **kwargs)}
    if len(keys) > 1:
        for key in keys:
            scores[key] = accuracy(model, tokenizer, [p for p in problems if p.teacher == key], **kwargs)
    return scores
