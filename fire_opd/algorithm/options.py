"""The FiRe-OPD options: one frozen dataclass, validated once, and the names of every choice.

`FireOptions` is what every entry point takes: `TrainConfig.fire`, TRL's `FireOPDConfig` (its
`fire_*` fields), verl's loss config and the loss functions (`fire=`).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Mapping, TypeVar, get_args

Method = Literal["opd", "fire", "filter_only", "reweight_only", "hard_token"]
FilterScope = Literal["batch", "group"]
FilterScore = Literal["teacher_mean", "teacher_sum", "advantage_mean"]
FilterMode = Literal["drop", "truncate", "verified"]
Objective = Literal["sampled", "full_vocab"]
Divergence = Literal["reverse_kl", "forward_kl", "jsd"]
LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]

METHODS: tuple[str, ...] = get_args(Method)
FILTER_SCOPES: tuple[str, ...] = get_args(FilterScope)
FILTER_SCORES: tuple[str, ...] = get_args(FilterScore)
FILTER_MODES: tuple[str, ...] = get_args(FilterMode)
OBJECTIVES: tuple[str, ...] = get_args(Objective)
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)
FILTER_METHODS = ("fire", "filter_only")  # the methods that drop rollouts
REWEIGHT_METHODS = ("fire", "reweight_only")  # the methods that weight tokens by c_t and u_t


@dataclass(frozen=True)
class FireOptions:
    """Which rollouts FiRe-OPD keeps and how it weights their tokens (steps 1-3 of the algorithm).

    method: "fire" (filter, then reweight), "opd" (plain on-policy distillation: keep all,
        weight 1), "filter_only", "reweight_only", or "hard_token" (keep the tokens whose
        score (1 + alpha c)(1 + beta u) is at or above its `percentile`-th percentile, weight 1).
    percentile: p of the filter threshold quantile(s, p / 100) in [0, 100]; 0 keeps everything.
    alpha: teacher-confidence strength (>= 0).
    beta: student-confusion strength (>= 0).
    filter_scope: "batch" (the paper: one quantile over the rollout batch) or "group" (over
        each prompt's own rollouts; beyond the paper; `fire/threshold` is then the mean of the
        prompts' thresholds over every process).
    filter_score: what the filter ranks: "teacher_mean" (the paper: mean log pi_T over the
        response), "teacher_sum" (no length normalization) or "advantage_mean"
        (mean log pi_T - log pi_old).
    teacher_confidence_gate: g in [0, 1] (beyond the paper; 0 disables): tokens with teacher
        confidence c = 1 - H_T / max H_T below g leave the loss, for every method.
    filter_mode: what happens to a rollout the filter flags (beyond the paper): "drop" (the
        paper: it leaves the loss), "truncate" (it keeps its tokens up to and including its first
        divergence token, the first whose teacher probability is below `divergence_prob`: the
        student's mistake stays in the loss, the continuation the teacher scores off its own
        distribution does not; a rollout without one stays whole), or "verified" (the trainer
        lets the teacher continue greedily from the student's prefix up to that token and the
        verifier checks the result: a rollout the teacher still finishes correctly stays whole,
        the others are truncated).
    divergence_prob: the teacher probability of a sampled token below which the student has left
        the teacher's distribution there (in (0, 1); truncate and verified).
    trust_ratio: multiply every token's weight by min(pi_T(y_t) / pi_old(y_t), 1), TrOPD's trust
        ratio (beyond the paper; composes with any method).
    """

    method: Method = field(default="fire", metadata={"help": f"one of {', '.join(get_args(Method))}"})
    percentile: float = field(
        default=20.0, metadata={"help": "drop the rollouts whose filter score is below this percentile (0: none)"}
    )
    alpha: float = field(default=1.0, metadata={"help": "teacher-confidence strength (>= 0)"})
    beta: float = field(default=1.0, metadata={"help": "student-confusion strength (>= 0)"})
    filter_scope: FilterScope = field(
        default="batch", metadata={"help": "batch (one quantile over the rollout batch) or group (per prompt)"}
    )
    filter_score: FilterScore = field(
        default="teacher_mean", metadata={"help": f"what the filter ranks: {', '.join(get_args(FilterScore))}"}
    )
    teacher_confidence_gate: float = field(
        default=0.0, metadata={"help": "tokens whose teacher confidence is below this leave the loss (0: off)"}
    )
    filter_mode: FilterMode = field(
        default="drop",
        metadata={
            "help": "what happens to a flagged rollout: drop (the paper), truncate (keep it up to its first "
            "divergence token) or verified (the teacher finishes it from there; kept whole if correct, else truncated)"
        },
    )
    divergence_prob: float = field(
        default=0.1,
        metadata={"help": "teacher probability below which a sampled token is a divergence (truncate, verified)"},
    )
    trust_ratio: bool = field(
        default=False, metadata={"help": "weight every token by min(pi_T / pi_old, 1), TrOPD's trust ratio"}
    )

    def __post_init__(self) -> None:
        check_fire_options({f.name: getattr(self, f.name) for f in fields(self)})

    @property
    def filters(self) -> bool:
        """Whether this method drops rollouts."""
        return self.method in FILTER_METHODS

    @property
    def truncates(self) -> bool:
        """Whether flagged rollouts keep a prefix instead of leaving the loss."""
        return self.filters and self.filter_mode != "drop"

    @property
    def reweights(self) -> bool:
        """Whether this method weights tokens by teacher confidence and student confusion."""
        return self.method in REWEIGHT_METHODS

    @classmethod
    def from_fields(cls, values: Mapping[str, Any], prefix: str = "") -> FireOptions:
        """FireOptions from `{prefix + field: value}`, with errors that name the fields as the
        caller spells them (TRL's `fire_alpha`, ...)."""
        picked = {f.name: values[prefix + f.name] for f in fields(cls) if prefix + f.name in values}
        check_fire_options(picked, prefix)
        return cls(**picked)


def check_fire_options(values: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ValueError naming the first invalid field (as `prefix + name`)."""

    def number(name: str, low: float, high: float) -> None:
        if name not in values:
            return
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{prefix}{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{prefix}{name} must be in [{low:g}, {high:g}], got {value!r}")

    def choice(name: str, choices: tuple[str, ...]) -> None:
        if name in values and values[name] not in choices:
            raise ValueError(f"{prefix}{name} must be one of {', '.join(choices)}; got {values[name]!r}")

    choice("method", METHODS)
    number("percentile", 0.0, 100.0)
    number("alpha", 0.0, math.inf)
    number("beta", 0.0, math.inf)
    choice("filter_scope", FILTER_SCOPES)
    choice("filter_score", FILTER_SCORES)
    number("teacher_confidence_gate", 0.0, 1.0)
    choice("filter_mode", FILTER_MODES)
    number("divergence_prob", 0.0, 1.0)
    if values.get("divergence_prob") in (0, 0.0, 1, 1.0):
        raise ValueError(f"{prefix}divergence_prob must be strictly between 0 and 1, got {values['divergence_prob']!r}")
    if "trust_ratio" in values and not isinstance(values["trust_ratio"], bool):
        raise ValueError(f"{prefix}trust_ratio must be true or false, got {values['trust_ratio']!r}")
    method = values.get("method", "fire")
    if values.get("filter_mode", "drop") != "drop" and method not in FILTER_METHODS:
        raise ValueError(
            f"{prefix}filter_mode {values['filter_mode']!r} acts on the rollouts the filter flags, and "
            f"{prefix}method {method!r} has no filter; use {' or '.join(FILTER_METHODS)}"
        )


T = TypeVar("T")


def with_fire_fields(prefix: str = "fire_", *, literals: bool = True) -> Callable[[type[T]], type[T]]:
    """A class decorator, placed under `@dataclass`, that declares every `FireOptions` field as
    `prefix + name` with its default and help (`field(metadata={"help": ...})`, which
    transformers' HfArgumentParser shows): the integrations' configs (TRL's `FireOPDConfig`,
    verl's loss config) take the FiRe options without restating them. `literals=False` types the
    choices as `str` (OmegaConf, verl's config system, has no Literal)."""
    hints = typing.get_type_hints(FireOptions)

    def declare(cls: type[T]) -> type[T]:
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for option in fields(FireOptions):
            name, kind = prefix + option.name, hints[option.name]
            if not literals and typing.get_origin(kind) is Literal:
                kind = str
            annotations[name] = kind
            setattr(cls, name, field(default=option.default, metadata=dict(option.metadata)))
        cls.__annotations__ = annotations
        return cls

    return declare
