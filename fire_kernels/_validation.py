"""Input checking shared by every backend: one place that turns bad input into a clear error.

Every message names the argument and says what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from fire_kernels.lm_head import LMHead

# Divergence kinds as the kernels see them (small ints become tl.constexpr).
DIV_NONE, DIV_REVERSE_KL, DIV_FORWARD_KL, DIV_JSD = 0, 1, 2, 3
DIVERGENCES = {None: DIV_NONE, "reverse_kl": DIV_REVERSE_KL, "forward_kl": DIV_FORWARD_KL, "jsd": DIV_JSD}

SUPPORTED_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "chunked", "reference")


@dataclass(frozen=True)
class HeadSpec:
    """What one model's head does after h W^T :

        z = softcap * tanh(((h W^T + b) * scale) / softcap) / tau     (softcap None: no tanh)

    The static part of an `LMHead` (fire_kernels/lm_head.py), what the kernels specialize on: the
    bias tensor travels next to the weight, this records only whether it exists."""

    has_bias: bool = False
    scale: float = 1.0
    softcap: Optional[float] = None

    @property
    def plain(self) -> bool:
        return not self.has_bias and self.scale == 1.0 and self.softcap is None


PLAIN_HEAD = HeadSpec()


@dataclass(frozen=True)
class StatsProblem:
    """Validated, normalized description of one token-statistics call."""

    num_tokens: int
    vocab_size: int
    has_teacher: bool
    divergence: int  # one of DIV_*; generalized JSD at beta 0 / 1 is mapped to forward / reverse KL
    jsd_beta: float
    inv_temperature: float
    ignore_index: int
    student_head: HeadSpec = PLAIN_HEAD
    teacher_head: HeadSpec = PLAIN_HEAD


def _check_matrix(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}; expected one of float16, bfloat16, float32 (float64 on the "
            "chunked and reference backends)"
        )
    return tensor


def _check_model(hidden_name: str, head_name: str, hidden: object, weight: object) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = _check_matrix(hidden_name, hidden)
    weight = _check_matrix(f"{head_name}.weight", weight)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} has hidden size D={hidden.shape[1]} but {head_name}.weight is {tuple(weight.shape)}; "
            f"expected {head_name}.weight of shape [V, {hidden.shape[1]}]"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"{hidden_name} ({hidden.dtype}) and {head_name}.weight ({weight.dtype}) must share a dtype; "
            "cast one of them"
        )
    return hidden, weight


def _check_head(name: str, head: LMHead) -> HeadSpec:
    """The HeadSpec of a head whose weight is checked; `name` is its argument ("head", "teacher_head")."""
    bias, logit_scale, logit_softcap = head.bias, head.logit_scale, head.logit_softcap
    rows = head.weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}.bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (rows,):
            raise ValueError(
                f"{name}.bias must have shape [{rows}] (one per vocab row of {name}.weight), got {tuple(bias.shape)}"
            )
        if bias.dtype not in SUPPORTED_FLOAT_DTYPES:
            raise TypeError(f"{name}.bias has dtype {bias.dtype}; expected a floating-point dtype")
        if bias.device != head.weight.device:
            raise ValueError(f"{name}.bias is on {bias.device} but {name}.weight is on {head.weight.device}")
    if (
        isinstance(logit_scale, bool)
        or not isinstance(logit_scale, (int, float))
        or not math.isfinite(logit_scale)
        or logit_scale <= 0
    ):
        raise ValueError(
            f"{name}.logit_scale must be a finite number > 0, got {logit_scale!r} (Granite divides "
            "by logits_scaling: pass its reciprocal)"
        )
    if logit_softcap is not None and (
        isinstance(logit_softcap, bool)
        or not isinstance(logit_softcap, (int, float))
        or not math.isfinite(logit_softcap)
        or logit_softcap <= 0
    ):
        raise ValueError(f"{name}.logit_softcap must be None or a finite number > 0, got {logit_softcap!r}")
    return HeadSpec(
        has_bias=bias is not None,
        scale=float(logit_scale),
        softcap=None if logit_softcap is None else float(logit_softcap),
    )


def validate_stats_inputs(
    student_hidden: object,
    head: LMHead,
    targets: object,
    teacher_hidden: Optional[object] = None,
    teacher_head: Optional[LMHead] = None,
    *,
    temperature: float = 1.0,
    divergence: Optional[str] = None,
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    backend: str = "auto",
    hidden_name: str = "student_hidden",
    target_vocab_size: Optional[int] = None,
) -> StatsProblem:
    """Check shapes, dtypes, devices and target range; raise ValueError/TypeError naming the argument.
    `hidden_name`: the caller's name of `student_hidden` ("hidden" in `token_stats`).
    `target_vocab_size`: the global vocabulary when the weights are shards (vocab-parallel)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    hidden, weight = _check_model(hidden_name, "head", student_hidden, head.weight)
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    if vocab_size == 0:
        raise ValueError(f"head.weight has an empty vocabulary (shape {tuple(weight.shape)})")
    student_spec = _check_head("head", head)
    teacher_spec = PLAIN_HEAD

    has_teacher = teacher_hidden is not None or teacher_head is not None
    devices = {"targets": None, hidden_name: hidden.device, "head.weight": weight.device}
    if has_teacher:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError("teacher_hidden and teacher_head must be given together")
        t_hidden, t_weight = _check_model("teacher_hidden", "teacher_head", teacher_hidden, teacher_head.weight)
        if t_weight.shape[0] != vocab_size:
            raise ValueError(
                f"vocab mismatch: teacher_head.weight has V={t_weight.shape[0]} rows but head.weight has "
                f"V={vocab_size}; teacher and student must share a vocabulary (heads padded to different sizes "
                "for one tokenizer: pass vocab_size=<the tokenizer's size>)"
            )
        if t_hidden.shape[0] != num_tokens:
            raise ValueError(
                f"teacher_hidden has {t_hidden.shape[0]} tokens but student_hidden has {num_tokens}; expected "
                "one teacher row per student token"
            )
        devices["teacher_hidden"] = t_hidden.device
        devices["teacher_head.weight"] = t_weight.device
        teacher_spec = _check_head("teacher_head", teacher_head)

    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 1 or targets.shape[0] != num_tokens:
        raise ValueError(f"targets must have shape [{num_tokens}] (one per token), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    devices["targets"] = targets.device
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")

    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be None, 'reverse_kl', 'forward_kl' or 'jsd', got {divergence!r}")
    if divergence is not None and not has_teacher:
        raise ValueError("divergence needs a teacher (teacher_hidden, teacher_head)")
    if not isinstance(jsd_beta, (int, float)) or not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta!r}")
    kind = DIVERGENCES[divergence]
    # TRL / Liger convention: generalized JSD at beta = 0 is KL(teacher || student) (forward),
    # at beta = 1 it is KL(student || teacher) (reverse); the mixture formula is undefined there.
    if kind == DIV_JSD and jsd_beta == 0.0:
        kind = DIV_FORWARD_KL
    elif kind == DIV_JSD and jsd_beta == 1.0:
        kind = DIV_REVERSE_KL

    if num_tokens > 0:
        limit = target_vocab_size or vocab_size
        out_of_range = ((targets < 0) | (targets >= limit)) & (targets != ignore_index)
        if bool(out_of_range.any()):
            bad = targets[out_of_range][:3].tolist()
            raise ValueError(f"targets must lie in [0, {limit}) or equal ignore_index={ignore_index}; found {bad}")
    return StatsProblem(
        num_tokens=num_tokens,
        vocab_size=vocab_size,
        has_teacher=has_teacher,
        divergence=kind,
        jsd_beta=float(jsd_beta),
        inv_temperature=1.0 / float(temperature),
        ignore_index=int(ignore_index),
        student_head=student_spec,
        teacher_head=teacher_spec,
    )
