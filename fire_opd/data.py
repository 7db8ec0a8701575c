"""Prompts, answers and the verifier; the built-in verifiable task suite.

Prompt files are JSONL, one object per line:

    {"prompt": "3+8-4=", "answer": "7", "teacher": "arith"}     # "teacher" optional

The verifier scores a completion as correct when its final answer (the text after the last
"=", stripped; the whole completion if it has none) equals the reference answer.

Built-in task families (the demo's default):
    arith    multi-step arithmetic with a worked answer:  "3+8-4="  ->  "11-4=7"
    reverse  digit reversal (5 to 7 digits):              "R:48213=" -> "31284"
A fixed hash split keeps held-out problems out of every training set.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

# Every character the built-in tasks use (the demo tokenizer is character-level).
TASK_ALPHABET = "0123456789+-=R:"


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    teacher: Optional[str] = None  # routing key in multi-teacher training
    solution: Optional[str] = None  # worked completion, for supervised warm-up of the demo models


def final_answer(completion: str) -> str:
    return completion.rsplit("=", 1)[-1].strip()


def is_correct(completion: str, answer: str) -> bool:
    return final_answer(completion) == answer.strip()


# ----------------------------------------------------------------------------- task families


def make_arith(rng: random.Random) -> Problem:
    a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
    op1, op2 = rng.choice("+-"), rng.choice("+-")
    first = a + b if op1 == "+" else a - b
    final = first + c if op2 == "+" else first - c
    return Problem(f"{a}{op1}{b}{op2}{c}=", str(final), "arith", f"{first}{op2}{c}={final}")


def make_reverse(rng: random.Random) -> Problem:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(5, 7)))
    return Problem(f"R:{digits}=", digits[::-1], "reverse", digits[::-1])


TASKS: dict[str, Callable[[random.Random], Problem]] = {"arith": make_arith, "reverse": make_reverse}


def is_held_out(problem: Problem, every: int = 4) -> bool:
    """Deterministic split: one problem in `every` (by a hash of its prompt) is held out."""
    return zlib.crc32(problem.prompt.encode()) % every == 0


def sample_problems(tasks: Iterable[str], count: int, *, seed: int, held_out: bool) -> list[Problem]:
    """`count` distinct problems (as far as the task has them) cycling over `tasks`, from one split."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; built-in tasks are {sorted(TASKS)}")
    rng = random.Random(seed)
    out: list[Problem] = []
    seen: set[str] = set()
    fruitless = 0  # consecutive draws that found nothing new: the split is exhausted
    while len(out) < count and fruitless < 20_000:
        problem = TASKS[tasks[len(out) % len(tasks)]](rng)
        if is_held_out(problem) != held_out or problem.prompt in seen:
            fruitless += 1
            continue
        fruitless = 0
        seen.add(problem.prompt)
        out.append(problem)
    return out


# ----------------------------------------------------------------------------- prompt files


def load_prompts(path: str | Path) -> list[Problem]:
    """Read a JSONL prompt file; errors name the file and the line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    problems = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            for key in ("prompt", "answer"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{lineno}: missing or non-string field {key!r}")
            teacher = record.get("teacher")
            if teacher is not None and not isinstance(teacher, str):
                raise ValueError(f"{path}:{lineno}: field 'teacher' must be a string")
            problems.append(Problem(record["prompt"], record["answer"], teacher, record.get("solution")))
    if not problems:
        raise ValueError(f"{path}: no prompts found")
    return problems


def write_prompts(problems: Iterable[Problem], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for p in problems:
            record = {"prompt": p.prompt, "answer": p.answer}
            if p.teacher is not None:
                record["teacher"] = p.teacher
            f.write(json.dumps(record) + "\n")
