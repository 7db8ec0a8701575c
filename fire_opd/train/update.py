"""Steps 3 and 4 of the loop: select with FiRe, then one optimizer step on the selected tokens.

`Updater.step` takes a step's scored rollouts and:
1. runs the FiRe selection over the whole rollout batch (every process's rows:
   `compute_fire_advantages` reduces over the process group), or per micro-batch with
   `loss.stats_scope: micro_batch` (the authors' released code);
2. plans micro-batches (one teacher each for the dense objective, whose loss needs the
   teacher's hidden states again, recomputed per micro-batch rather than held through the update);
3. accumulates each micro-batch's loss, normalized by the batch-wide count, into the gradient
   (`Parallelism` supplies every world-size factor);
4. clips, skips a non-finite step, steps AdamW and the schedule.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

from fire_kernels import TeacherStudentStats
from fire_opd.algorithm.objectives import loss_normalizer
from fire_opd.algorithm.selection import compute_fire_advantages
from fire_opd.errors import TrainingStopped
from fire_opd.parallel import distributed
from fire_opd.parallel.parallelism import MicroBatch, Parallelism
from fire_opd.train.checkpoint import TrainState
from fire_opd.train.config import TrainConfig
from fire_opd.train.forwards import LossTarget, StudentForward, TeacherForward
from fire_opd.train.health import filter_diagnostics
from fire_opd.train.optim import build_optimizer
from fire_opd.train.rollouts import Rollouts
from fire_opd.train.scoring import TeacherPlan

logger = logging.getLogger("fire_opd")


def warmup_cosine(config: TrainConfig) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup, then cosine decay to optim.min_lr_ratio."""
    optim = config.optim

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine

    return factor


class Updater:
    """The optimizer, the schedule, and the step that uses them on the student's and teachers'
    forward modules (`forwards.py`, wrapped by `Parallelism.wrap`)."""

    def __init__(
        self,
        config: TrainConfig,
        student: StudentForward,
        teachers: dict[str, TeacherForward],
        parallel: Parallelism,
    ):
        self.config, self.student, self.teachers, self.parallel = config, student, teachers, parallel
        optim = config.optim
        self.optimizer = build_optimizer(student.model, optim, master_weights=optim.master_weights)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(config))
        self.skipped_in_a_row = 0

    def step(
        self,
        rollouts: Rollouts,
        scores: TeacherStudentStats,
        plan: TeacherPlan,
        health: Optional[dict] = None,
        *,
        state: TrainState,
        teacher_reliable: Optional[torch.Tensor] = None,
    ) -> dict:
        """One optimizer step on a step's scored rollouts; returns its metrics (the loss, the
        gradient norm, FiRe's selection statistics, `train/step_skipped`). A skipped step is
        counted in `state`. `plan`: the step's micro-batches by teacher, as scoring ran them (the
        dense objective's micro-batches; the clipped surrogate's take any rows). `teacher_reliable`:
        [B] bool, fire.filter_mode "verified"'s verdicts (`verify.verify_flagged`)."""
        cfg, parallel = self.config, self.parallel
        mask = rollouts.response_mask
        old_log_prob, student_entropy = scores.student_log_prob, scores.student_entropy
        teacher_log_prob, teacher_entropy = scores.teacher_log_prob, scores.teacher_entropy
        assert teacher_log_prob is not None and teacher_entropy is not None  # scored with the teachers
        group_ids = rollouts.group_ids(cfg.sampling.samples_per_prompt)  # for fire.filter_scope="group"
        dense = cfg.loss.objective == "full_vocab"  # the dense loss reads one teacher per micro-batch
        micro_batches = plan.micro_batches if dense else self._any_rows(len(rollouts), mask.device)

        metrics: dict = {}  # the whole batch's selection statistics (already global)
        local: dict = {}  # this process's values, made global in one collective after the micro-steps
        counts: dict = {}  # ... of which these are summed over processes
        pooled: dict = {}  # ... and these (numerator, denominator) pairs pooled (health.filter_diagnostics)
        by_micro_batch = cfg.loss.stats_scope == "micro_batch"
        if not by_micro_batch:
            selection = compute_fire_advantages(
                old_log_prob, teacher_log_prob, student_entropy, teacher_entropy, mask, fire=cfg.fire,
                group_ids=group_ids, teacher_reliable=teacher_reliable,
            )  # fmt: skip
            normalizer = loss_normalizer(selection.loss_mask, cfg.loss.agg_mode)
            metrics = dict(selection.metrics)
            if health is not None and cfg.fire.filters:
                counts, pooled = filter_diagnostics(
                    selection.kept_rollouts,
                    health,
                    mask,
                    teacher_log_prob,
                    old_log_prob,
                    cfg.sampling.samples_per_prompt,
                )

        # the module whose forward computes the loss, inside its DDP wrapper when it has one
        student = parallel.wrapper if parallel.wrapper is not None else self.student
        student.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, loss_metrics = 0.0, dict[str, float]()
        real = sum(1 for batch in micro_batches if not batch.padding)
        for index, batch in enumerate(micro_batches):
            rows = batch.rows
            if by_micro_batch:
                # the released code: statistics inside each micro-batch (of this process: no
                # collective), its loss averaged over its own tokens, then over every process's
                # micro-batches
                part = compute_fire_advantages(
                    old_log_prob[rows], teacher_log_prob[rows], student_entropy[rows], teacher_entropy[rows],
                    mask[rows], fire=cfg.fire, group_ids=group_ids[rows], process_group=distributed.LOCAL,
                )  # fmt: skip
                part_normalizer, scale = None, parallel.micro_batch_scale(real)
                if not batch.padding:
                    local = _accumulate(local, part.metrics, real)
            else:
                part, part_normalizer, scale = selection.rows(rows), normalizer, 1.0
            if batch.padding:  # only there to keep every process's collectives in step
                part = part.without_tokens()
            tokens = rollouts.tokens(rows)
            teacher = self.teachers[batch.teacher](tokens) if batch.teacher is not None else None
            with parallel.gradient_sync(index, len(micro_batches)):
                loss, batch_metrics = student(tokens, teacher, LossTarget(part, old_log_prob[rows], part_normalizer))
                (loss * scale * parallel.backward_scale).backward()
            total_loss += float(loss.detach()) * scale / parallel.reported_loss_divisor
            if not batch.padding:
                loss_metrics = _accumulate(loss_metrics, batch_metrics, real)
        # the loss is summed over processes (each share already divided), every other value averaged
        local.update({**loss_metrics, **counts, "train/loss": total_loss})
        local = distributed.mean_over_ranks(local, summed=("train/loss", *counts), pooled=pooled)
        grad_norm = parallel.clip_grad_norm(self.student.model, cfg.optim.max_grad_norm)
        skipped = self._skip_if_not_finite(local["train/loss"], grad_norm, state)
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()  # the schedule follows the step count either way
        return {
            **metrics,
            **local,
            "train/grad_norm": grad_norm,
            "train/step_skipped": float(skipped),
        }

    def _any_rows(self, rows: int, device: torch.device) -> list[MicroBatch]:
        """The clipped surrogate needs no teacher: micro-batches of any rows."""
        every_row = {None: torch.arange(rows, device=device)}
        return self.parallel.plan_micro_batches(every_row, self.config.optim.micro_batch_size)

    def _skip_if_not_finite(self, loss: float, grad_norm: float, state: TrainState) -> bool:
        """A step whose loss or gradient norm is not finite leaves the weights and the optimizer
        state as they are: its gradients are dropped, it is logged with its cause, and
        `optim.max_skipped_steps` such steps in a row stop the run with an error."""
        cause = None
        if not math.isfinite(loss):
            cause = f"loss {loss}"
        elif not math.isfinite(grad_norm):
            cause = f"gradient norm {grad_norm}"
        if cause is None:
            self.skipped_in_a_row = 0
            return False
        self.optimizer.zero_grad(set_to_none=True)
        state.skipped_steps += 1
        self.skipped_in_a_row += 1
        step = state.step
        logger.warning("step %d skipped: %s is not finite (weights and optimizer state unchanged)", step + 1, cause)
        if self.skipped_in_a_row >= self.config.optim.max_skipped_steps:
            raise TrainingStopped(
                f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient norm "
                f"(last: {cause}, step {step + 1}); stopping. Lower optim.lr, check the data, or raise "
                "optim.max_skipped_steps"
            )
        return True


def _accumulate(total: dict, metrics: dict, count: int) -> dict:
    """Running mean of metric dicts over `count` micro-batches."""
    total = dict(total)
    for key, value in metrics.items():
        total[key] = total.get(key, 0.0) + value / count
    return total
