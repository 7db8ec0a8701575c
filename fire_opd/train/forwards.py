"""The per-micro-batch computations of a step, as modules: the ones DDP / FSDP wrap.

A distillation step runs two kinds of forward on a micro-batch of rollouts, and each is an
`nn.Module` whose `forward` returns what the step needs, never the `[tokens, vocab]` logits:

- `TeacherForward`: a teacher's final hidden states at the response positions and its output
  head (no gradient);
- `StudentForward`: with no `target`, the per-token statistics of student and teacher (scoring,
  no gradient); with a `target`, the loss of the selected tokens and its metrics (the update).
  One module for both because FSDP2 has one root per model: the student's shards are gathered by
  this module's forward, whichever of the two it computes.

`Parallelism.wrap` wraps these modules once, at setup (DDP around `StudentForward`, FSDP2 on the
decoder layers and then on the module), so the wrappers' hooks see the fused loss and FSDP gathers
the lm_head inside the forward that reads it. `StudentForward.generate` is the student's sampler:
under FSDP2 it is registered as a forward method, so the root's parameters are gathered for it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from fire_kernels import TeacherStudentStats
from fire_opd.algorithm.objectives import dense_coefficients
from fire_opd.algorithm.selection import FireSelection
from fire_opd.ops.heads import LMHead, lm_head, response_hidden_states
from fire_opd.ops.loss_from_hidden import FireOPDLoss, response_token_stats
from fire_opd.train.config import TrainConfig
from fire_opd.train.rollouts import ResponseTokens


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """bf16 autocast for a float32 model on CUDA, around the decoder and the kernels alike: a
    float32 decoder's final hidden states stay float32 under autocast (the residual stream is
    float32), so it is the kernels that cast them and the head to bf16 for their products, as
    autocast does for a matmul (fire_kernels.token_stats' doc)."""
    if device.type == "cuda" and dtype == "float32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class TeacherOutput:
    """What the student's forward reads of a teacher: hidden states and the head they meet."""

    hidden: torch.Tensor  # [B, T, D] final hidden states predicting the response tokens
    head: LMHead  # weight [V, D] in the hidden states' dtype


@dataclass
class LossTarget:
    """What the update's loss needs beyond the forwards: the micro-batch's selection and the
    sampler's log-probs (all detached)."""

    selection: FireSelection  # this micro-batch's rows of the step's FiRe selection
    old_log_prob: torch.Tensor  # [B, T] log pi_old of the sampled tokens (the clipped surrogate's ratio)
    normalizer: Optional[float]  # the batch-wide count the loss is divided by (None: the micro-batch's own)


class TeacherForward(nn.Module):
    """A frozen teacher's forward for the student's loss: hidden states and head, no logits."""

    model: nn.Module

    def __init__(self, model: nn.Module, *, device: torch.device, model_dtype: str):
        super().__init__()
        self.model = model
        self.device, self.model_dtype = device, model_dtype

    @torch.no_grad()
    def forward(self, batch: ResponseTokens) -> TeacherOutput:
        with autocast(self.device, self.model_dtype):
            hidden = response_hidden_states(self.model, batch.input_ids, batch.attention_mask, batch.prompt_len)
        # read here: under FSDP2 this module's forward is what gathers the head
        return TeacherOutput(hidden, lm_head(self.model).to(hidden.dtype))


class StudentForward(nn.Module):
    """The student's forward on a micro-batch: statistics for scoring, or the loss for the update.

    `loss` holds the objective's settings (temperature, backend, divergence, aggregation, the
    vocabulary group); scoring reads the temperature, backend and vocabulary from it too, so both
    passes see the same logits."""

    model: nn.Module

    def __init__(self, model: nn.Module, loss: FireOPDLoss, *, device: torch.device, model_dtype: str):
        super().__init__()
        self.model = model
        self.loss = loss
        self.device, self.model_dtype = device, model_dtype

    def forward(
        self, batch: ResponseTokens, teacher: Optional[TeacherOutput] = None, target: Optional[LossTarget] = None
    ) -> TeacherStudentStats | tuple[torch.Tensor, dict]:
        """Without `target`: per-token [B, T] statistics of student and `teacher` (the sampler's
        log-prob and entropy, the teacher's, the full-vocab reverse KL). With `target`: (loss,
        metrics), the dense divergence to `teacher` or, with no teacher, the clipped surrogate."""
        with autocast(self.device, self.model_dtype):
            hidden = response_hidden_states(self.model, batch.input_ids, batch.attention_mask, batch.prompt_len)
            head = lm_head(self.model).to(hidden.dtype)  # under FSDP2 gathered by this forward
            loss = self.loss
            if target is None:
                assert teacher is not None  # scoring reads every teacher
                return response_token_stats(
                    hidden, head, batch.response_ids, batch.response_mask, teacher.hidden, teacher.head,
                    temperature=loss.temperature, divergence="reverse_kl", backend=loss.backend,
                    vocab_process_group=loss.vocab_process_group, vocab_size=loss.vocab_size,
                )  # fmt: skip
            part = target.selection
            if teacher is not None:
                coefficients = dense_coefficients(part, loss.loss_agg_mode, target.normalizer)
                return loss.dense(
                    hidden, head, teacher.hidden, teacher.head, batch.response_ids, coefficients, part.loss_mask
                )
            return loss.sampled(
                hidden, head, batch.response_ids, target.old_log_prob, part.advantages, part.loss_mask,
                normalizer=target.normalizer,
            )  # fmt: skip

    def generate(self, *args, **kwargs) -> torch.Tensor:
        """The student's `generate` (registered as an FSDP2 forward method when sharded)."""
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]  # transformers GenerationMixin


def build_forwards(
    config: TrainConfig,
    student: nn.Module,
    teachers: dict[str, nn.Module],
    *,
    device: torch.device,
    vocab_group: Optional[Any] = None,
    vocab_size: Optional[int] = None,
) -> tuple[StudentForward, dict[str, TeacherForward]]:
    """The run's forward modules, from its config (`vocab_size`: the tokenizer's, for padded
    heads; `vocab_group`: parallel.vocab's process group)."""
    loss = FireOPDLoss(
        clip_ratio=config.loss.clip_ratio,
        loss_agg_mode=config.loss.agg_mode,
        temperature=config.sampling.temperature,
        backend=config.runtime.backend,
        fused_update=config.runtime.fused_update,
        divergence=config.loss.divergence,
        jsd_beta=config.loss.jsd_beta,
        vocab_process_group=vocab_group,
        vocab_size=vocab_size,
    )
    dtype = config.models.dtype
    return (
        StudentForward(student, loss, device=device, model_dtype=dtype),
        {name: TeacherForward(teacher, device=device, model_dtype=dtype) for name, teacher in teachers.items()},
    )
