"""Prompts and answers: the `Problem` type and prompt files.

Prompt files are JSONL, one object per line, with a raw prompt or chat messages:

    {"prompt": "3+8-4=", "answer": "7", "teacher": "arith"}     # "teacher" optional
    {"messages": [{"role": "user", "content": "What is 3+8-4?"}], "answer": "7"}

`messages` rows are rendered with the tokenizer's chat template (`render_prompts`). Other
fields are kept in `Problem.row` for verifiers (fire_opd/train/verifiers.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    teacher: Optional[str] = None  # routing key in multi-teacher training
    solution: Optional[str] = None  # worked completion, for supervised warm-up of the demo models
    messages: Optional[tuple] = None  # chat messages ({"role", "content"} dicts); `prompt` is their rendering
    row: Optional[Mapping] = field(default=None, compare=False, hash=False)  # the JSONL object, for verifiers


def load_prompts(path: str | Path) -> list[Problem]:
    """Read a JSONL prompt file; errors name the file and the line number. `messages` rows get
    an empty `prompt` until `render_prompts` applies the chat template."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    problems = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            problems.append(problem_from_row(record, where))
    if not problems:
        raise ValueError(f"{path}: no prompts found")
    return problems


def problem_from_row(record, where: str) -> Problem:
    """One prompt row: {"prompt" | "messages", "answer", optional "teacher", any other fields}."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise ValueError(
            f"{where}: give exactly one of 'prompt' (a string) or 'messages' (a list of {{'role', 'content'}} objects)"
        )
    messages = None
    if has_messages:
        messages = record["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}} objects")
        messages = tuple(dict(m) for m in messages)
    elif not isinstance(record["prompt"], str):
        raise ValueError(f"{where}: missing or non-string field 'prompt'")
    if not isinstance(record.get("answer"), str):
        raise ValueError(f"{where}: missing or non-string field 'answer'")
    teacher = record.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        raise ValueError(f"{where}: field 'teacher' must be a string")
    return Problem(record.get("prompt", ""), record["answer"], teacher, record.get("solution"), messages, record)


def render_prompts(
    problems: list[Problem], tokenizer, chat_template_kwargs: Optional[Mapping] = None, *, source: str = "prompts"
) -> list[Problem]:
    """Problems whose `messages` are rendered into `prompt` with the tokenizer's chat template
    (`add_generation_prompt=True` plus `chat_template_kwargs`, e.g. {"enable_thinking": False}).
    The rendered text is tokenized later without adding special tokens: the template has them."""
    if not any(p.messages for p in problems):
        return list(problems)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{source} has 'messages' rows but the tokenizer has no chat template; use 'prompt' rows "
            "or a tokenizer with one (chat_template.jinja, or chat_template in tokenizer_config.json)"
        )
    kwargs = dict(chat_template_kwargs or {})
    return [
        replace(
            p,
            prompt=tokenizer.apply_chat_template(
                list(p.messages), tokenize=False, add_generation_prompt=True, **kwargs
            ),
        )
        if p.messages
        else p
        for p in problems
    ]


def prepare_problems(
    config, tokenizer, train: Optional[list[Problem]] = None, held_out: Optional[list[Problem]] = None
) -> tuple[list[Problem], list[Problem]]:
    """A TrainConfig's training and evaluation problems (read from its files unless given), the
    held-out ones cut to `eval_size`, chat rows rendered."""
    train = train if train is not None else load_prompts(config.data.prompts)
    held_out = (
        held_out
        if held_out is not None
        else (load_prompts(config.data.eval_prompts) if config.data.eval_prompts else [])
    )
    held_out = held_out[: config.eval.size] if config.eval.size else []
    return (
        render_prompts(train, tokenizer, config.data.chat_template_kwargs, source="prompts"),
        render_prompts(held_out, tokenizer, config.data.chat_template_kwargs, source="eval_prompts"),
    )


def prompt_batch(problems: list[Problem], step: int, per_step: int, seed: int) -> list[Problem]:
    """A step's prompts: consecutive slices of per-epoch permutations of `problems`, a function of
    (seed, step) only, so a resumed run draws what the uninterrupted one would have."""
    n = len(problems)
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(problems[int(perm[offset])])
    return out


def write_prompts(problems: Iterable[Problem], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for p in problems:
            record = {"prompt": p.prompt, "answer": p.answer}
            if p.teacher is not None:
                record["teacher"] = p.teacher
            f.write(json.dumps(record) + "\n")
