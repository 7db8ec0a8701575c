"""Verifiers: how a completion is scored against a prompt row's reference answer.

A verifier is any function

    verifier(completion: str, answer: str, row: Mapping) -> float in [0, 1]

where `row` is the prompt file's JSON object (so a verifier can read extra fields, e.g. test
cases). The trainer uses it for `train/reward` and evaluation only: the loss never depends on
it. Name one in the config as `verifier: "package.module:function"` or by a built-in name:

    final_answer   the text after the last "=" equals the answer (the built-in tasks' rule)
    last_number    the last number in the completion equals the answer numerically
    boxed          the content of the last \\boxed{...} equals the answer (math benchmarks;
                   whitespace, "$" and a trailing "." are ignored, numbers compare numerically)
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Callable, Mapping, Optional

Verifier = Callable[[str, str, Mapping], float]

_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _as_number(text: str) -> Optional[float]:
    text = text.strip().rstrip(".").replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _same(found: str, answer: str) -> bool:
    """Equal as numbers when both are numbers, else as stripped strings."""
    a, b = _as_number(found), _as_number(answer)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return found.strip() == answer.strip()


def final_answer(completion: str, answer: str, row: Optional[Mapping] = None) -> float:
    """1.0 when the text after the last "=" (the whole completion if there is none) equals the
    answer, as strings (the built-in tasks' rule: "11-4=7" answers "7")."""
    return float(completion.rsplit("=", 1)[-1].strip() == answer.strip())


def last_number(completion: str, answer: str, row: Optional[Mapping] = None) -> float:
    """1.0 when the last number in the completion equals the answer numerically ("... so 1,024."
    answers "1024")."""
    numbers = _NUMBER.findall(completion)
    return float(bool(numbers) and _same(numbers[-1], answer))


def boxed_content(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: the completion was cut off inside the box


def boxed(completion: str, answer: str, row: Optional[Mapping] = None) -> float:
    """1.0 when the last \\boxed{...} holds the answer ("$", spaces and a trailing "." ignored;
    numbers compared numerically)."""
    content = boxed_content(completion)
    if content is None:
        return 0.0
    clean = lambda s: s.replace("$", "").replace(" ", "").rstrip(".")  # noqa: E731
    inner = boxed_content(answer)  # a reference written as \boxed{...} too
    return float(_same(clean(content), clean(inner if inner is not None else answer)))


BUILTIN_VERIFIERS: dict[str, Verifier] = {"final_answer": final_answer, "last_number": last_number, "boxed": boxed}


def _import_from_here(module_name: str):
    """The module, also from the current directory: `python -m` puts it on sys.path, the
    `fire-opd` console script (and torchrun) do not, and a user's verifier usually lives there."""
    import os
    import sys

    try:
        return importlib.import_module(module_name)
    except ImportError:
        here = os.getcwd()
        if here in sys.path:
            raise
    sys.path.append(here)
    return importlib.import_module(module_name)


def resolve_verifier(spec: str | Verifier) -> Verifier:
    """A built-in name, "package.module:function", or a callable. Errors name the spec."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"verifier must be a built-in name {sorted(BUILTIN_VERIFIERS)} or 'package.module:function', got {spec!r}"
        )
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"verifier {spec!r} is neither a built-in {sorted(BUILTIN_VERIFIERS)} nor of the form "
            "'package.module:function'"
        )
    try:
        module = _import_from_here(module_name)
    except ImportError as exc:
        raise ValueError(
            f"verifier {spec!r}: cannot import module {module_name!r} ({exc}); it must be importable from the current "
            "directory or PYTHONPATH (e.g. my_verifiers.py in the folder you run fire-opd from)"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"verifier {spec!r}: module {module_name!r} has no function {attr!r}")
    return function


def score(verifier: Verifier, completion: str, answer: str, row: Mapping) -> float:
    """The verifier's score, checked to be a number in [0, 1]."""
    value = verifier(completion, answer, row)
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        name = getattr(verifier, "__qualname__", repr(verifier))
        raise ValueError(
            f"verifier {name} returned {value!r} for completion {completion[:80]!r}; "
            "a verifier must return a number in [0, 1]"
        )
    return float(value)
