"""Prompts, answers and the verifier; the built-in verifiable task suite.

Prompt files are JSONL, one object per line, with a raw prompt or chat messages:

    {"prompt": "3+8-4=", "answer": "7", "teacher": "arith"}     # "teacher" optional
    {"messages": [{"role": "user", "content": "What is 3+8-4?"}], "answer": "7"}

`messages` rows are rendered with the tokenizer's chat template (`render_prompts`). Other
fields are kept in `Problem.row` for verifiers (fire_opd/verifiers.py); the built-in tasks'
verifier scores a completion as correct when the text after the last "=" equals the answer.

Built-in task families:
    arith    two-step arithmetic with a worked answer:    "3+8-4="  ->  "11-4=7"
    reverse  digit reversal (5 to 7 digits):              "R:48213=" -> "31284"
    chain    six-term chains with a worked solution in one of three valid formats
             (the "chain" demo setting, the paper's regime: long solutions, a teacher with
             real entropy where several continuations are correct):
               "3+8-4+2-5+7="  ->  "11-4+2-5+7=7+2-5+7=9-5+7=4+7=11"   (rewrite)
                               ->  "3+8=11,11-4=7,7+2=9,9-5=4,4+7=11"  (steps)
                               ->  "8+3+2+7=20,5+4=9,20-9=11"          (group, terms in any order)
A fixed hash split keeps held-out problems out of every training set.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from .verifiers import final_answer

# Every character the built-in tasks use (the demo tokenizers are character-level).
TASK_ALPHABET = "0123456789+-=R:"  # arith, reverse
CHAIN_ALPHABET = "0123456789+-=,"  # chain
CHAIN_TERMS = 6


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    teacher: Optional[str] = None  # routing key in multi-teacher training
    solution: Optional[str] = None  # worked completion, for supervised warm-up of the demo models
    messages: Optional[tuple] = None  # chat messages ({"role", "content"} dicts); `prompt` is their rendering
    row: Optional[Mapping] = field(default=None, compare=False, hash=False)  # the JSONL object, for verifiers


def is_correct(completion: str, answer: str) -> bool:
    """The built-in tasks' rule (`verifiers.final_answer`)."""
    return final_answer(completion, answer) == 1.0


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


def chain_terms(prompt: str) -> list[int]:
    """"3+8-4=" -> [3, 8, -4]."""
    return [int(t) for t in re.findall(r"[+-]?\d", prompt.rstrip("="))]


def _signed(value: int) -> str:
    return f"+{value}" if value >= 0 else str(value)


CHAIN_LAYOUTS = ("rewrite", "steps", "group")


def chain_solution(terms: list[int], rng: random.Random, layout: Optional[str] = None) -> str:
    """One valid worked solution of a chain, in `layout` (one of CHAIN_LAYOUTS; by default drawn
    from `rng`, as is the term order of "group")."""
    layout = CHAIN_LAYOUTS[rng.randrange(3)] if layout is None else layout
    if layout not in CHAIN_LAYOUTS:
        raise ValueError(f"layout must be one of {CHAIN_LAYOUTS}, got {layout!r}")
    if layout == "rewrite":  # fold the first two terms, restate the rest
        return chain_rewrite(terms)
    if layout == "steps":  # one binary operation per step
        return chain_steps(terms)
    positives, negatives = [t for t in terms if t >= 0], [-t for t in terms if t < 0]
    rng.shuffle(positives)
    rng.shuffle(negatives)
    pos, neg = sum(positives), sum(negatives)
    parts = [f"{'+'.join(map(str, positives))}={pos}"] if len(positives) > 1 else []
    if negatives:
        if len(negatives) > 1:
            parts.append(f"{'+'.join(map(str, negatives))}={neg}")
        parts.append(f"{pos}-{neg}={pos - neg}")
    return ",".join(parts) if parts else f"{pos}={pos}"


def chain_steps(terms: list[int], rng: Optional[random.Random] = None) -> str:
    """The "steps" solution, one binary operation per step: "3+8=11,11-4=7,...". With `rng`, each
    addition of two non-negative numbers is written either way round ("3+8=11" or "8+3=11", drawn
    from `rng`): two correct continuations there, so a teacher trained on them keeps real entropy."""
    value, parts = terms[0], []
    for t in terms[1:]:
        swap = rng is not None and t >= 0 and value >= 0 and rng.random() < 0.5  # never "5+-6"
        parts.append(f"{t}+{value}={value + t}" if swap else f"{value}{_signed(t)}={value + t}")
        value += t
    return ",".join(parts)


def chain_rewrite(terms: list[int], *, ignore_signs: bool = False) -> str:
    """The "rewrite" solution: fold the first two terms, restate the rest, until one value is left.
    `ignore_signs=True` folds every term after the second with its absolute value while restating
    the terms correctly: a confidently wrong rule, with the first fold (and so the first value a
    student writes) still right. The `brittle-teacher` setting's teacher continues rewrites with it."""
    value, parts = terms[0], []
    for k in range(1, len(terms)):
        value += abs(terms[k]) if ignore_signs and k >= 2 else terms[k]
        parts.append(str(value) + "".join(_signed(t) for t in terms[k + 1:]))
    return "=".join(parts)


def make_chain(rng: random.Random) -> Problem:
    terms = [rng.randint(0, 9)] + [rng.choice((1, -1)) * rng.randint(0, 9) for _ in range(CHAIN_TERMS - 1)]
    prompt = str(terms[0]) + "".join("+" + str(t) if t >= 0 else str(t) for t in terms[1:]) + "="
    # -0 prints as "+0": the sign is drawn independently of the digit, so re-read the terms
    terms = chain_terms(prompt)
    return Problem(prompt, str(sum(terms)), "chain", chain_solution(terms, rng))


TASKS: dict[str, Callable[[random.Random], Problem]] = {"arith": make_arith, "reverse": make_reverse,
                                                        "chain": make_chain}

# A well-formed completion of each task (EOS removed): anything else is format drift.
_EXPR = r"-?\d+(?:[+-]\d+)*"
ANSWER_FORMATS = {
    "arith": re.compile(r"^-?\d+[+-]\d+=-?\d+$"),
    "reverse": re.compile(r"^\d+$"),
    "chain": re.compile(rf"^{_EXPR}(?:[=,]{_EXPR})*=-?\d+$"),
}


def is_well_formed(completion: str, task: Optional[str]) -> bool:
    """Whether a completion follows its task's answer format (True for tasks without one)."""
    pattern = ANSWER_FORMATS.get(task or "")
    return pattern is None or bool(pattern.match(completion.strip()))


SPLITS = ("train", "validation", "test")


def split_of(problem: Problem) -> str:
    """Deterministic split by a hash of the prompt: 1/4 "test" (held-out problems, reported),
    1/8 "validation" (recipes are chosen here), the rest "train"."""
    bucket = zlib.crc32(problem.prompt.encode()) % 8
    return "test" if bucket in (0, 4) else "validation" if bucket == 1 else "train"


def is_held_out(problem: Problem) -> bool:
    return split_of(problem) == "test"


def sample_problems(tasks: Iterable[str], count: int, *, seed: int, split: str) -> list[Problem]:
    """`count` distinct problems (as far as the task has them) cycling over `tasks`, from one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
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
        if split_of(problem) != split or problem.prompt in seen:
            fruitless += 1
            continue
        fruitless = 0
        seen.add(problem.prompt)
        out.append(problem)
    return out


# ----------------------------------------------------------------------------- prompt files


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
        raise ValueError(f"{where}: give exactly one of 'prompt' (a string) or 'messages' (a list of "
                         "{'role', 'content'} objects)")
    messages = None
    if has_messages:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
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


def render_prompts(problems: list[Problem], tokenizer, chat_template_kwargs: Optional[Mapping] = None,
                   *, source: str = "prompts") -> list[Problem]:
    """Problems whose `messages` are rendered into `prompt` with the tokenizer's chat template
    (`add_generation_prompt=True` plus `chat_template_kwargs`, e.g. {"enable_thinking": False}).
    The rendered text is tokenized later without adding special tokens: the template has them."""
    if not any(p.messages for p in problems):
        return list(problems)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{source} has 'messages' rows but the tokenizer has no chat template; use 'prompt' rows "
                         "or a tokenizer with one (chat_template.jinja, or chat_template in tokenizer_config.json)")
    kwargs = dict(chat_template_kwargs or {})
    return [replace(p, prompt=tokenizer.apply_chat_template(list(p.messages), tokenize=False,
                                                            add_generation_prompt=True, **kwargs))
            if p.messages else p for p in problems]


def prepare_problems(config, tokenizer, train: Optional[list[Problem]] = None,
                     held_out: Optional[list[Problem]] = None) -> tuple[list[Problem], list[Problem]]:
    """A TrainConfig's training and evaluation problems (read from its files unless given), the
    held-out ones cut to `eval_size`, chat rows rendered."""
    train = train if train is not None else load_prompts(config.prompts)
    held_out = held_out if held_out is not None else (load_prompts(config.eval_prompts) if config.eval_prompts else [])
    held_out = held_out[: config.eval_size] if config.eval_size else []
    return (render_prompts(train, tokenizer, config.chat_template_kwargs, source="prompts"),
            render_prompts(held_out, tokenizer, config.chat_template_kwargs, source="eval_prompts"))


def write_prompts(problems: Iterable[Problem], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for p in problems:
            record = {"prompt": p.prompt, "answer": p.answer}
            if p.teacher is not None:
                record["teacher"] = p.teacher
            f.write(json.dumps(record) + "\n")
