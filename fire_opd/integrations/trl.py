"""FiRe-OPD inside TRL's on-policy `DistillationTrainer` (TRL 1.16): change the class, not the trainer.

    from fire_opd.integrations.trl import FireOPDConfig, FireOPDDistillationTrainer

    args = FireOPDConfig(output_dir="out", beta=1.0, fire_method="fire", fire_percentile=20.0, ...)
    trainer = FireOPDDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                         train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Everything TRL does stays TRL's: prompts and chat templates, generation (transformers or vLLM),
PEFT, the optimizer, logging, checkpoints. Two methods change:

  `_generate_and_score_completions`  after TRL generates the generation batch, one no-grad
      sweep per micro-batch of rows computes, from hidden states and lm_head weights (no
      logits), every sampled token's student log-prob and entropy and teacher log-prob and
      entropy; `compute_fire_advantages` turns them into the FiRe filter and weights over the
      **whole generation batch, across all processes** (its quantile, maxima and means are
      all-reduced over torch.distributed's default group); the per-token loss coefficients ride
      along in the batch as `fire_*` tensors.
  `_compute_loss`  per micro-batch, the loss from hidden states in one fused sweep
      (fire_opd.ops.loss_from_hidden.FireOPDLoss): `fire_objective="full_vocab"` (default) is
      sum_t k_t w_t D_t(student || teacher) with D the divergence TRL's `beta` selects (the
      generalized JSD: 1 = reverse KL, 0 = forward KL), exactly TRL's loss when w = 1 and no
      rollout is dropped (`fire_method="opd"`); `fire_objective="sampled"` is the paper's PPO
      clipped surrogate on the sampled token's advantage log pi_T - log pi_old.

Gradient accumulation and generation batching: TRL generates `per_device_train_batch_size x
gradient_accumulation_steps` completions per process once per optimizer step, shuffles them and
splits them into micro-batches; FiRe's statistics and the loss normalizer are computed over that
whole generation batch on every process before the split, so the accumulated gradient is the
gradient of one whole-batch FiRe loss (mean over the kept tokens of every process). With
`steps_per_generation` > `gradient_accumulation_steps` (several optimizer steps per generation)
the statistics span the generation batch, as the paper's mini-batch PPO updates do.

Cost: the statistics need the teacher's log-probs of the whole generation batch before any
update, so each step runs one extra no-grad forward of student and teacher over it (TRL's own
loss runs the teacher forward per micro-batch too; that one stays).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from trl import DistillationConfig, DistillationTrainer

from fire_kernels import BACKENDS
from fire_opd.algorithm.objectives import dense_coefficients, loss_normalizer
from fire_opd.algorithm.options import LOSS_AGG_MODES, OBJECTIVES, FireOptions, with_fire_fields
from fire_opd.algorithm.selection import compute_fire_advantages
from fire_opd.ops.heads import lm_head
from fire_opd.ops.loss_from_hidden import FireOPDLoss, response_token_stats
from fire_opd.parallel import distributed
from fire_opd.parallel.parallelism import averaged_gradient_scale, plan_micro_batches
from fire_opd.train.models import shared_vocabulary

# per-token [B, T] tensors added to TRL's generation batch (split and shuffled with it)
FIRE_KEYS = ("fire_old_log_prob", "fire_student_entropy", "fire_advantages", "fire_loss_mask", "fire_coefficients")


@dataclass
@with_fire_fields("fire_")  # every FireOptions field as fire_<name>, with its default and help
class FireOPDConfig(DistillationConfig):
    """TRL's DistillationConfig plus the FiRe-OPD fields. TRL's own `beta` keeps its meaning (the
    JSD interpolation of the dense divergence), so FiRe's student-confusion strength is `fire_beta`.
    TRL samples one completion per prompt, so the filter ranks the whole generation batch
    (fire-opd's `filter_scope: group` has no groups here)."""

    fire_clip_ratio: float = field(default=0.2, metadata={"help": "PPO epsilon (fire_objective='sampled')"})
    fire_loss_agg_mode: str = field(default="token-mean", metadata={"help": f"one of {LOSS_AGG_MODES}"})
    fire_objective: str = field(default="full_vocab", metadata={"help": f"one of {OBJECTIVES}"})
    fire_backend: str = field(
        default="auto", metadata={"help": "fire_kernels backend: auto | triton | chunked | reference"}
    )
    fire_filter_eval: bool = field(
        default=False,
        metadata={
            "help": "filter and reweight in evaluation too; by default evaluation scores every completion with "
            "weight 1, so that eval_loss is plain TRL's"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        # the FiRe fields, validated once and named as the user wrote them (fire_beta, not TRL's beta)
        self.fire = FireOptions.from_fields(vars(self), prefix="fire_")
        if self.fire.filter_mode == "verified":  # the trainer's teachers generate; TRL's loss only scores
            raise ValueError(
                "fire_filter_mode 'verified' needs fire-opd's trainer (its teachers finish the flagged rollouts); "
                "use drop or truncate here"
            )
        if self.fire.filter_scope != "batch":  # TRL samples one completion per prompt: no groups to rank in
            raise ValueError(
                f"fire_filter_scope must be batch here (one completion per prompt); got {self.fire.filter_scope!r}"
            )
        for name, allowed in (
            ("fire_loss_agg_mode", LOSS_AGG_MODES),
            ("fire_objective", OBJECTIVES),
            ("fire_backend", BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        clip = self.fire_clip_ratio
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 <= clip < 1.0:
            raise ValueError(f"fire_clip_ratio must be a number in [0, 1), got {clip!r}")


class FireOPDDistillationTrainer(DistillationTrainer):
    """TRL's DistillationTrainer with the FiRe-OPD loss computed by fire-opd's kernels from hidden
    states (see the module docstring). Takes the same arguments, with `args` a FireOPDConfig."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, FireOPDConfig):
            raise TypeError(f"args must be a FireOPDConfig, got {type(self.args).__name__}")
        a = self.fire_args
        # heads padded past the tokenizer (differently for student and teacher): the statistics
        # run over the tokenizer's vocabulary
        self.fire_vocab_size = shared_vocabulary(
            self.accelerator.unwrap_model(self.model), {"teacher": self.accelerator.unwrap_model(self.teacher_model)},
            self.processing_class,
        )  # fmt: skip
        self.fire_loss = FireOPDLoss(
            clip_ratio=a.fire_clip_ratio,
            loss_agg_mode=a.fire_loss_agg_mode,
            temperature=self.temperature,
            backend=a.fire_backend,
            divergence="jsd",
            jsd_beta=self.beta,
            vocab_size=self.fire_vocab_size,
        )
        if self.fire_vocab_size is not None:
            self._suppress_padded_rows()

    def _suppress_padded_rows(self) -> None:
        """Heads padded past the tokenizer (Qwen's): transformers' generate never samples a padded
        row, as fire-opd's own sampler never does (those ids are no tokens, and the statistics run
        over the tokenizer's vocabulary only)."""
        rows = lm_head(_base(self.accelerator.unwrap_model(self.model))).weight.shape[0]
        padded = list(range(cast(int, self.fire_vocab_size), rows))
        suppressed = list(self.generation_kwargs.get("suppress_tokens") or [])
        self.generation_kwargs["suppress_tokens"] = suppressed + [i for i in padded if i not in suppressed]
        self.generation_config.suppress_tokens = self.generation_kwargs["suppress_tokens"]

    @property
    def fire_args(self) -> FireOPDConfig:
        """`args`, typed as what `__init__` checked it to be."""
        return cast(FireOPDConfig, self.args)

    # ------------------------------------------------------------------ statistics over the generation batch

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super()._generate_and_score_completions(inputs)
        if self.fire_vocab_size is not None:
            self._cut_at_padded_ids(batch)
        batch.update(self._fire_statistics(batch))
        return batch

    def _cut_at_padded_ids(self, batch: dict[str, Any]) -> None:
        """A completion that holds a padded id (a generator that does not take `suppress_tokens`,
        such as vLLM) ends before it: that token and the ones after it leave the loss and become
        padding, so no padded id reaches a softmax over the tokenizer's vocabulary. Counted as
        fire/padded_id_tokens."""
        ids = batch["completion_ids"]
        after = (ids >= cast(int, self.fire_vocab_size)).long().cumsum(1) > 0
        mode = "train" if self.model is not None and self.model.training else "eval"
        self._metrics[mode]["fire/padded_id_tokens"].append(float((after & batch["completion_mask"].bool()).sum()))
        if after.any():
            batch["completion_mask"] = batch["completion_mask"].masked_fill(after, 0)
            batch["completion_ids"] = ids.masked_fill(after, self._tokenizer.pad_token_id)

    @torch.no_grad()
    def _fire_statistics(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        a = self.fire_args
        mask = self._loss_mask(batch)
        # the generation batch in micro-batches of TRL's per-device size (the trainer's planner;
        # every process scores its own rows, so no process waits on another)
        rows = {None: torch.arange(mask.shape[0], device=mask.device)}
        columns = [
            self._token_stats(part.rows, batch) for part in plan_micro_batches(rows, a.per_device_train_batch_size)
        ]
        old_log_prob, student_entropy, teacher_log_prob, teacher_entropy, reverse_kl = (
            torch.cat(c) for c in zip(*columns)
        )
        mode = "train" if self.model is not None and self.model.training else "eval"
        # evaluation keeps every completion at weight 1 unless asked: eval_loss is then plain TRL's
        options = a.fire if mode == "train" or a.fire_filter_eval else replace(a.fire, method="opd")
        fire = compute_fire_advantages(
            old_log_prob, teacher_log_prob, student_entropy, teacher_entropy, mask, fire=options
        )
        # Every process's loss is normalized by the count over all processes; DDP then averages the
        # gradients over processes, which the factor undoes (as TRL does)
        scale = averaged_gradient_scale(self.accelerator.num_processes)
        normalizer = loss_normalizer(fire.loss_mask, a.fire_loss_agg_mode) / scale
        for key, value in fire.metrics.items():
            self._metrics[mode][key].append(value)
        tokens = max(int(mask.sum()), 1)
        self._metrics[mode]["fire/full_vocab_reverse_kl"].append(float(reverse_kl[mask].sum()) / tokens)
        return {
            "fire_old_log_prob": old_log_prob,
            "fire_student_entropy": student_entropy,
            "fire_advantages": fire.advantages,
            "fire_loss_mask": fire.loss_mask,
            "fire_coefficients": dense_coefficients(fire, a.fire_loss_agg_mode, normalizer),
            "fire_normalizer": torch.tensor(normalizer, device=mask.device),
        }

    def _token_stats(self, rows: torch.Tensor, batch: dict[str, Any]):
        """Per-token statistics of some rows of the generation batch, from hidden states (no logits)."""
        sub = {key: batch[key][rows] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
        if "tool_mask" in batch:
            sub["tool_mask"] = batch["tool_mask"][rows]
        student_hidden, teacher_hidden = self._hidden_states(self.model_wrapped, sub, grad=False)
        stats = response_token_stats(
            student_hidden,
            self._head(self.accelerator.unwrap_model(self.model_wrapped)).to(student_hidden.dtype),
            sub["completion_ids"],
            self._loss_mask(sub),
            teacher_hidden,
            self._head(self.accelerator.unwrap_model(self.teacher_model)).to(teacher_hidden.dtype),
            temperature=self.temperature,
            divergence="reverse_kl",
            backend=self.fire_args.fire_backend,
            vocab_size=self.fire_vocab_size,
        )
        return (
            stats.student_log_prob,
            stats.student_entropy,
            stats.teacher_log_prob,
            stats.teacher_entropy,
            stats.divergence,
        )

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log, with the `fire/*` metrics of every process: the loss metrics, the full-vocab
        reverse KL and the padded-id count come from this process's rows (the selection's are
        global already: the same on every process, so their mean is them). Reduced here, where
        every process calls `log` in step, not inside the wrapped forward that computes them."""
        mode = "train" if self.model is not None and self.model.training else "eval"
        local = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if k.startswith("fire/") and v}
        if local and distributed.active():  # a count is summed, every other value averaged
            reduced = distributed.mean_over_ranks(local, summed=("fire/padded_id_tokens",))
            self._metrics[mode].update({k: [v] for k, v in reduced.items()})
        super().log(logs, start_time)

    # ------------------------------------------------------------------ the loss of one micro-batch

    def _compute_loss(self, unwrapped_student, inputs: dict[str, Any], num_items_in_batch):
        """Returns (loss, student entropy sum, valid tokens), the contract of TRL's `_compute_loss`."""
        a = self.fire_args
        student_hidden, teacher_hidden = self._hidden_states(unwrapped_student, inputs, grad=True, unwrapped=True)
        student_head = self._head(unwrapped_student).to(student_hidden.dtype)
        loss_mask = inputs["fire_loss_mask"]
        if a.fire_objective == "full_vocab":
            teacher_head = self._head(self.accelerator.unwrap_model(self.teacher_model)).to(teacher_hidden.dtype)
            loss, metrics = self.fire_loss.dense(
                student_hidden,
                student_head,
                teacher_hidden,
                teacher_head,
                inputs["completion_ids"],
                inputs["fire_coefficients"],
                loss_mask,
            )
        else:
            loss, metrics = self.fire_loss.sampled(
                student_hidden,
                student_head,
                inputs["completion_ids"],
                inputs["fire_old_log_prob"],
                inputs["fire_advantages"],
                loss_mask,
                normalizer=float(inputs["fire_normalizer"]),
            )
        mode = "train" if self.model is not None and self.model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        mask = self._loss_mask(inputs)
        entropy_sum = (inputs["fire_student_entropy"] * mask).sum()
        return loss, entropy_sum.detach(), mask.sum()

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _loss_mask(batch: dict[str, Any]) -> torch.Tensor:
        mask = batch["completion_mask"].bool()
        return mask & batch["tool_mask"].bool() if "tool_mask" in batch else mask

    def _hidden_states(self, student, batch: dict[str, Any], *, grad: bool, unwrapped: bool = False):
        """[B, T, D] last hidden states of student and teacher over the completion tokens, with
        TRL's own `_get_last_hidden_state` (PEFT, VLM inputs, logits_to_keep) and its FSDP-safe
        forward redirection."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        keep = batch["completion_ids"].size(1)
        if unwrapped:  # inside TRL's compute_loss: already redirected through the student's wrapper
            student_hidden = self._get_last_hidden_state(student, input_ids, attention_mask, keep)
        else:
            with torch.set_grad_enabled(grad):
                student_hidden = self._forward_redirection(
                    student,
                    self.accelerator.unwrap_model(student),
                    self._get_last_hidden_state,
                    self.accelerator.unwrap_model(student),
                    input_ids,
                    attention_mask,
                    keep,
                )
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, teacher, self._get_last_hidden_state, teacher, input_ids, attention_mask, keep
            )
        return student_hidden, teacher_hidden

    @staticmethod
    def _head(model):
        """The model's output head (weight, bias, logit scale, soft-cap), under a PEFT wrapper too."""
        return lm_head(_base(model))


def _base(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.base_model.model if _is_peft(model) else model


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


__all__ = ["FIRE_KEYS", "FireOPDConfig", "FireOPDDistillationTrainer"]
