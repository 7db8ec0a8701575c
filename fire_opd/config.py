"""Trainer configuration: one documented dataclass, loadable from YAML, overridable from the CLI."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .loss import DIVERGENCES, FILTER_SCOPES, FILTER_SCORES, LOSS_AGG_MODES, METHODS, OBJECTIVES


@dataclass
class TrainConfig:
    """Everything a FiRe-OPD run needs. Field comments are the documentation."""

    # --- models and data
    student: str = ""  # path of the student (AutoModelForCausalLM, Hugging Face format)
    teachers: dict[str, str] = field(default_factory=dict)  # name -> path; one entry for single-teacher
    tokenizer: Optional[str] = None  # tokenizer path; defaults to the student's
    prompts: str = ""  # JSONL training prompts: {"prompt" or "messages", "answer", optional "teacher", ...}
    eval_prompts: Optional[str] = None  # JSONL held-out prompts for periodic evaluation
    chat_template_kwargs: dict = field(default_factory=dict)  # passed to apply_chat_template for "messages" rows,
    #                                                           e.g. {enable_thinking: false} for Qwen3
    verifier: str = "final_answer"  # scores completions for train/reward and evaluation (never the loss): a
    #                                 built-in (final_answer | last_number | boxed) or "package.module:function"
    default_teacher: Optional[str] = None  # teacher for prompts without a "teacher" key
    output_dir: str = "runs/fire-opd"

    # --- algorithm (DESIGN.md, "The algorithm")
    method: str = "fire"  # opd | fire | filter_only | reweight_only | hard_token
    percentile: float = 20.0  # rollout filter: drop scores below quantile(s, p / 100)
    filter_scope: str = "batch"  # "batch": one quantile over the rollout batch (the paper); "group": over each
    #                              prompt's own rollouts (beyond the paper; needs samples_per_prompt > 1)
    filter_score: str = "teacher_mean"  # what the filter ranks: "teacher_mean" (the paper), "teacher_sum" (no
    #                                     length normalization), "advantage_mean" (mean log pi_T - log pi_old)
    teacher_confidence_gate: float = 0.0  # beyond the paper: tokens with teacher confidence
    #                                       c = 1 - H_T / max H_T below this leave the loss (0: off)
    alpha: float = 1.0  # teacher-confidence strength
    beta: float = 1.0  # student-confusion strength
    clip_ratio: float = 0.2  # PPO epsilon
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    stats_scope: str = "batch"  # "batch": FiRe statistics over the whole rollout batch;
    #                             "micro_batch": per micro-batch, as the authors' released code does
    temperature: float = 1.0  # sampling temperature, also used for log-probs and entropies
    objective: str = "full_vocab"  # "full_vocab": the exact per-token divergence (TRL's DistillationTrainer;
    #                                the default: it won on both demo settings' validation splits, see README);
    #                                "sampled": PPO surrogate on the sampled token's advantage (the paper, verl)
    divergence: str = "reverse_kl"  # full_vocab only: reverse_kl | forward_kl | jsd
    jsd_beta: float = 0.5  # full_vocab with divergence=jsd: 0 = forward KL, 1 = reverse KL (TRL / Liger)

    # --- rollouts
    steps: int = 100  # optimizer steps (one rollout batch each)
    prompts_per_step: int = 16  # global: over all processes under torchrun
    rollout_chunk_prompts: int = 0  # prompts per sampling chunk, each with its own seed (seed, step, chunk);
    #                                 chunks are dealt to processes, so the same config gives the same rollouts
    #                                 with 1 or K processes. 0: one chunk per step (single process only)
    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    top_p: float = 1.0

    # --- optimization
    micro_batch_size: int = 32  # rollouts per forward/backward; gradients accumulate to one step
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_skipped_steps: int = 10  # a step whose loss or gradient norm is not finite changes no weight or optimizer
    #                              state and is counted (train/skipped_steps); this many in a row stop the run

    # --- evaluation, logging, checkpoints
    eval_every: int = 20  # 0: only at the end
    eval_size: int = 256
    eval_samples: int = 1  # completions per held-out problem: eval/accuracy is avg@N, plus eval/pass@k
    eval_temperature: float = 0.0  # 0: greedy (then eval_samples must be 1)
    eval_top_p: float = 1.0
    save_every: int = 0  # 0: only the final checkpoint
    keep_last: int = 0  # keep only the newest N step-* checkpoints ("final" is always kept); 0: keep all
    log_every: int = 1
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    progress: bool = True  # tqdm progress bar
    resume_from: Optional[str] = None  # "latest" (the newest complete checkpoint in output_dir) or a checkpoint
    #                                    directory written by this trainer
    overwrite: bool = False  # replace a run already in output_dir (otherwise a new run there is refused)

    # --- runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # student parameter dtype: float32 | bfloat16; on CUDA float32 runs under bf16 autocast
    teacher_dtype: Optional[str] = None  # teachers' parameter dtype (default: dtype), e.g. bfloat16 teachers
    #                                      for a float32 student: half the teacher memory
    gradient_checkpointing: bool = False  # the student's own activation checkpointing (recompute in backward)
    parallel: str = "ddp"  # under torchrun: "ddp" (every process holds the student) or "fsdp" (FSDP2: each holds
    #                        1 / K of the student's parameters, gradients and optimizer state)
    teacher_parallel: str = "replicate"  # under torchrun: "replicate" (default: each process scores its own rollouts
    #                                      with a whole teacher, no communication) or "fsdp" (FSDP2: 1 / K of each
    #                                      teacher per process, gathered layer by layer for every forward; for a
    #                                      teacher that does not fit one device; needs fused_update)
    vocab_parallel: bool = False  # under torchrun with parallel: ddp: each process holds 1 / K of the rows of the
    #                               student's and every teacher's lm_head (and of the student's head gradient and
    #                               AdamW state); statistics run over all processes' tokens (fire_opd.sharded_head);
    #                               needs fused_update, stats_scope: batch and untied lm_heads
    backend: str = "auto"  # fire_kernels backend: auto | triton | chunked | reference
    fused_update: bool = True  # form the student's gradients in the forward sweep (fire_kernels.fused_update)
    threads: int = 0  # torch CPU threads (0: torch's default). CPU reductions, and so a run's numbers, depend
    #                   on it: fix it to reproduce a seed

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.filter_scope not in FILTER_SCOPES:
            raise ValueError(f"filter_scope must be one of {FILTER_SCOPES}, got {self.filter_scope!r}")
        if self.filter_score not in FILTER_SCORES:
            raise ValueError(f"filter_score must be one of {FILTER_SCORES}, got {self.filter_score!r}")
        if not 0.0 <= self.teacher_confidence_gate <= 1.0:
            raise ValueError(f"teacher_confidence_gate must be in [0, 1], got {self.teacher_confidence_gate}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.stats_scope not in ("batch", "micro_batch"):
            raise ValueError(f"stats_scope must be 'batch' or 'micro_batch', got {self.stats_scope!r}")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch_size",
                     "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "eval_size", "log_every", "threads", "keep_last",
                     "rollout_chunk_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.rollout_chunk_prompts and self.prompts_per_step % self.rollout_chunk_prompts:
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of rollout_chunk_prompts "
                             f"({self.rollout_chunk_prompts})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.teacher_parallel not in ("replicate", "fsdp"):
            raise ValueError(f"teacher_parallel must be 'replicate' or 'fsdp', got {self.teacher_parallel!r}")
        if self.teacher_parallel == "fsdp" and not self.fused_update:
            raise ValueError("teacher_parallel: fsdp needs fused_update: true (the unfused backward would read the "
                             "teacher's lm_head after its shards were released)")
        if self.vocab_parallel and (self.parallel != "ddp" or self.teacher_parallel != "replicate"):
            raise ValueError("vocab_parallel: true runs with parallel: ddp and teacher_parallel: replicate (FSDP2 "
                             "shards the lm_heads its own way)")
        if self.vocab_parallel and not self.fused_update:
            raise ValueError("vocab_parallel: true needs fused_update: true (each lm_head shard's gradient over every "
                             "process's tokens is formed in the fused sweep)")
        if self.vocab_parallel and self.stats_scope != "batch":
            raise ValueError("vocab_parallel: true needs stats_scope: batch (the loss covers every process's tokens, "
                             "so its per-token weights must be the batch's)")
        if self.teacher_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"teacher_dtype must be float32, bfloat16 or float16, got {self.teacher_dtype!r}")
        if self.eval_samples < 1 or self.eval_temperature < 0 or not 0 < self.eval_top_p <= 1:
            raise ValueError(f"eval_samples must be >= 1, eval_temperature >= 0 and eval_top_p in (0, 1], got "
                             f"{self.eval_samples}, {self.eval_temperature}, {self.eval_top_p}")
        if self.eval_samples > 1 and self.eval_temperature == 0:
            raise ValueError(f"eval_samples={self.eval_samples} needs eval_temperature > 0 (greedy decoding would "
                             "repeat one completion)")
        if not isinstance(self.chat_template_kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a mapping, got {type(self.chat_template_kwargs).__name__}")
        if self.backend not in ("auto", "triton", "chunked", "reference"):
            raise ValueError(f"backend must be auto, triton, chunked or reference, got {self.backend!r}")
        if not isinstance(self.teachers, dict):
            raise TypeError(f"teachers must be a mapping name -> path, got {type(self.teachers).__name__}")
        if self.default_teacher is not None and self.teachers and self.default_teacher not in self.teachers:
            raise ValueError(f"default_teacher {self.default_teacher!r} is not among teachers {sorted(self.teachers)}")

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Optional[list[str]] = None) -> "TrainConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields")
        return cls.from_dict(data, overrides)

    @classmethod
    def from_dict(cls, data: dict, overrides: Optional[list[str]] = None) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        merged = dict(data)
        for item in overrides or []:
            key, value = parse_override(item, cls)
            merged[key] = value
        hints = typing.get_type_hints(cls)
        return cls(**{key: _coerce(key, value, hints[key]) for key, value in merged.items()})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out


def _coerce(key: str, value: Any, hint) -> Any:
    """YAML 1.1 reads `3e-4` as a string and `1` where a float is meant: convert scalars to the
    field's type, with an error that names the field."""
    target = {float: float, int: int, Optional[float]: float, Optional[int]: int}.get(hint)
    if target is None or value is None or isinstance(value, bool):
        return value
    try:
        return target(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {key!r} expects {target.__name__}, got {value!r}") from None


def parse_override(item: str, cls=TrainConfig) -> tuple[str, Any]:
    """`key=value` with the value parsed as YAML (numbers, booleans, lists, mappings)."""
    import yaml

    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ValueError(f"unknown config field {key!r} in override {item!r}")
    value = yaml.safe_load(raw)
    hint = typing.get_type_hints(cls)[key]
    if hint is str or hint == Optional[str]:
        value = raw if value is not None or hint is str else None
    return key, value
