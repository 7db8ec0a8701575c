"""The built-in verifiable task suite of the demo.

Task families:
    arith    two-step arithmetic with a worked answer:    "3+8-4="  ->  "11-4=7"
    reverse  digit reversal (5 to 7 digits):              "R:48213=" -> "31284"
    chain    six-term chains with a worked solution in one of three valid formats
             (long solutions, a teacher with real entropy where several continuations are correct):
               "3+8-4+2-5+7="  ->  "11-4+2-5+7=7+2-5+7=9-5+7=4+7=11"   (rewrite)
                               ->  "3+8=11,11-4=7,7+2=9,9-5=4,4+7=11"  (steps)
                               ->  "8+3+2+7=20,5+4=9,20-9=11"          (group, terms in any order)
A completion is correct when the text after the last "=" equals the answer. A fixed hash
split keeps held-out problems out of every training set.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Callable, Iterable, Optional

from fire_opd.train.data import Problem
from fire_opd.train.verifiers import final_answer

# Every character the built-in tasks use (the demo tokenizers are character-level).
TASK_ALPHABET = "0123456789+-=R:"  # arith, reverse


CHAIN_ALPHABET = "0123456789+-=,"  # chain


CHAIN_TERMS = 6


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
    """ "3+8-4=" -> [3, 8, -4]."""
    return [int(t) for t in re.findall(r"[+-]?\d", prompt.rstrip("="))]


def _signed(value: int) -> str:
    return f"+{value}" if value >= 0 else str(value)


CHAIN_LAYOUTS = ("rewrite", "steps", "group")


def chain_solution(terms: list[int], rng: random.Random) -> str:
    """One valid worked solution of a chain, in a layout of CHAIN_LAYOUTS drawn from `rng` (as is
    the term order of "group")."""
    layout = CHAIN_LAYOUTS[rng.randrange(3)]
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


CASCADE_ERRORS = (-2, -1, 1, 2)  # how far the wrongly restated value is from the right one


def chain_steps_after_error(terms: list[int], rng: random.Random) -> tuple[str, int]:
    """A "steps" solution that goes wrong in the middle and continues confidently wrong: the step
    chosen among the second to the fourth restates the running value wrongly (value + e, e in
    `CASCADE_ERRORS`: a copy error, which a model sees by comparing it with the result just
    written), and from there every step adds |t| whatever t's sign (restating t correctly).
    Returns (text, k): the first k characters, through the wrongly restated value, are the
    context the `error-cascade` teacher learns to continue, not to write."""
    value, k = terms[0], 0
    parts: list[str] = []
    wrong_step = rng.randint(1, min(3, len(terms) - 2))
    for step, t in enumerate(terms[1:]):
        if step == wrong_step:
            value += rng.choice(CASCADE_ERRORS)
            k = len(",".join([*parts, str(value)]))
        result = value + (abs(t) if step >= wrong_step else t)
        parts.append(f"{value}{_signed(t)}={result}")
        value = result
    return ",".join(parts), k


def chain_rewrite(terms: list[int], *, ignore_signs: bool = False) -> str:
    """The "rewrite" solution: fold the first two terms, restate the rest, until one value is left.
    `ignore_signs=True` folds every term after the second with its absolute value while restating
    the terms correctly: a confidently wrong rule, with the first fold (and so the first value a
    student writes) still right. The `brittle-teacher` setting's teacher continues rewrites with it."""
    value, parts = terms[0], []
    for k in range(1, len(terms)):
        value += abs(terms[k]) if ignore_signs and k >= 2 else terms[k]
        parts.append(str(value) + "".join(_signed(t) for t in terms[k + 1 :]))
    return "=".join(parts)


def make_chain(rng: random.Random) -> Problem:
    terms = [rng.randint(0, 9)] + [rng.choice((1, -1)) * rng.randint(0, 9) for _ in range(CHAIN_TERMS - 1)]
    prompt = str(terms[0]) + "".join("+" + str(t) if t >= 0 else str(t) for t in terms[1:]) + "="
    # -0 prints as "+0": the sign is drawn independently of the digit, so re-read the terms
    terms = chain_terms(prompt)
    return Problem(prompt, str(sum(terms)), "chain", chain_solution(terms, rng))


TASKS: dict[str, Callable[[random.Random], Problem]] = {
    "arith": make_arith,
    "reverse": make_reverse,
    "chain": make_chain,
}


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
