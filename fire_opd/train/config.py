"""Trainer configuration: sections of documented dataclasses, validated once, from YAML and `--set`.

A run's config reads as sections (YAML mappings, or dotted keys on the command line):

    models:     student, teachers, tokenizer, default_teacher, dtype, teacher_dtype, gradient_checkpointing
    lora:       r, alpha, dropout, target_modules, merge_lora
    data:       prompts, eval_prompts, prompts_split, eval_prompts_split, prompt_field, answer_field,
                messages_field, chat_template_kwargs, verifier
    sampling:   prompts_per_step, samples_per_prompt, rollout_chunk_prompts, max_new_tokens, temperature, top_p
    loss:       objective, divergence, jsd_beta, clip_ratio, agg_mode, stats_scope
    fire:       method, percentile, alpha, beta, filter_scope, filter_score, teacher_confidence_gate
    optim:      steps, lr, weight_decay, adam_betas, warmup_steps, min_lr_ratio, max_grad_norm,
                micro_batch_size, max_skipped_steps
    parallel:   student, teachers, vocab
    runtime:    device, threads, backend, fused_update
    eval:       every, size, samples, temperature, top_p
    checkpoint: save_every, keep_last, resume_from, overwrite
    logging:    every, report_to, progress
    seed, output_dir

The flat keys of earlier versions (`lr`, `method`, `eval_every`, ...) are still accepted, in YAML
and in `--set`, with one warning line that names their new spelling (`LEGACY_KEYS`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from fire_opd.algorithm.options import DIVERGENCES, LOSS_AGG_MODES, OBJECTIVES, FireOptions

logger = logging.getLogger("fire_opd")


def _choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _at_least(section: str, obj: Any, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(obj, name) < low:
            raise ValueError(f"{section}.{name} must be >= {low}, got {getattr(obj, name)}")


def _in_range(section: str, name: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    ok = (low < value if open_low else low <= value) and value <= high and math.isfinite(value)
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{section}.{name} must be in {bracket}{low:g}, {high:g}], got {value}")


# fire_kernels.BACKENDS, spelled out so that the command line's checks import no torch (a test keeps the two
# equal)
KERNEL_BACKENDS = ("auto", "triton", "chunked", "reference")


def default_teacher(configured: Optional[str], teachers: Iterable[str]) -> Optional[str]:
    """The teacher of prompts without a teacher key: `models.default_teacher`, else the only
    teacher, else none (every prompt must then name its teacher)."""
    names = list(teachers)
    return configured or (names[0] if len(names) == 1 else None)


@dataclass
class ModelsConfig:
    """The models of a run (Hugging Face format: a folder or a hub id in the local cache)."""

    student: str = field(default="", metadata={"help": "the student (AutoModelForCausalLM)"})
    teachers: dict[str, str] = field(
        default_factory=dict, metadata={"help": "name -> path; one entry for single-teacher runs"}
    )
    tokenizer: Optional[str] = field(default=None, metadata={"help": "tokenizer path; defaults to the student's"})
    default_teacher: Optional[str] = field(
        default=None, metadata={"help": 'teacher for prompts without a "teacher" key'}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": (
                "the student's dtype: float32 | bfloat16 (its full fine-tune trains through float32 master weights,"
                " optim.master_weights); on CUDA a float32 student runs under bf16 autocast, its decoder and the"
                " heads' products in bf16, and samples its rollouts there too (evaluation runs in float32)"
            )
        },
    )
    teacher_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "teachers' dtype (default: dtype), e.g. bfloat16 teachers for a float32 student: half the teacher "
                "memory"
            )
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "the student's own activation checkpointing (recompute in backward)"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.teachers, dict):
            raise TypeError(f"models.teachers must be a mapping name -> path, got {type(self.teachers).__name__}")
        if self.default_teacher is not None and self.teachers and self.default_teacher not in self.teachers:
            raise ValueError(
                f"models.default_teacher {self.default_teacher!r} is not among teachers {sorted(self.teachers)}"
            )
        _choice("models", "dtype", self.dtype, ("float32", "bfloat16"))
        _choice("models", "teacher_dtype", self.teacher_dtype, (None, "float32", "bfloat16", "float16"))


@dataclass
class LoraConfig:
    """A LoRA student (through peft): only the adapters train, and checkpoints hold only them.
    r = 0 (the default) trains every weight."""

    r: int = field(default=0, metadata={"help": "adapter rank; 0: full fine-tuning"})
    alpha: float = field(default=16.0, metadata={"help": "scale alpha / r of the adapters' product"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    target_modules: Union[str, list] = field(
        default="all-linear",
        metadata={
            "help": '"all-linear" (every linear layer but the lm_head) or a list of module names, e.g. [q_proj, v_proj]'
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": (
                "also write output_dir/final-merged: the adapters merged into the student's weights, a plain model "
                "folder for from_pretrained"
            )
        },
    )

    def __post_init__(self) -> None:
        _at_least("lora", self, ("r",), 0)
        _in_range("lora", "alpha", self.alpha, 0.0, math.inf, open_low=True)
        _in_range("lora", "dropout", self.dropout, 0.0, 1.0)
        modules = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"lora.target_modules must be 'all-linear' or a list of module names, got {modules!r}")
        if "lm_head" in modules:
            raise ValueError(
                "lora.target_modules: not lm_head (fire-opd's kernels read the lm_head weight directly, so an "
                "adapter on it would not train)"
            )

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class DataConfig:
    """Prompts and how completions are scored."""

    prompts: str = field(
        default="",
        metadata={
            "help": (
                "training prompts: a .jsonl/.json/.csv/.tsv/.parquet file, a folder (of such files, or written by"
                " datasets' save_to_disk) or a Hugging Face dataset id; rows hold a prompt or chat messages, an "
                'answer, optionally a "teacher" key (fire_opd/train/data.py)'
            )
        },
    )
    eval_prompts: Optional[str] = field(
        default=None, metadata={"help": "held-out prompts for periodic evaluation (the same kinds of source)"}
    )
    prompts_split: str = field(
        default="train", metadata={"help": "the split of a dataset id or folder that `prompts` reads"}
    )
    eval_prompts_split: str = field(
        default="train", metadata={"help": 'the split `eval_prompts` reads (e.g. "test" of the same dataset id)'}
    )
    prompt_field: str = field(default="prompt", metadata={"help": "the column with the raw prompt text"})
    answer_field: str = field(default="answer", metadata={"help": "the column with the reference answer"})
    messages_field: str = field(
        default="messages",
        metadata={
            "help": (
                "the column with chat messages ({role, content} lists), used instead of a prompt on the rows that "
                "have them"
            )
        },
    )
    chat_template_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": 'passed to apply_chat_template for "messages" rows, e.g. {enable_thinking: false} for Qwen3'},
    )
    verifier: str = field(
        default="final_answer",
        metadata={
            "help": (
                "scores completions for train/reward and evaluation (never the loss): a built-in (final_answer | "
                'last_number | boxed) or "package.module:function"'
            )
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.chat_template_kwargs, dict):
            raise TypeError(
                f"data.chat_template_kwargs must be a mapping, got {type(self.chat_template_kwargs).__name__}"
            )
        columns = {"prompt_field": self.prompt_field, "answer_field": self.answer_field}
        columns["messages_field"] = self.messages_field
        splits = {"prompts_split": self.prompts_split, "eval_prompts_split": self.eval_prompts_split}
        for name, value in {**columns, **splits}.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name} must be a non-empty string, got {value!r}")
        if len(set(columns.values())) < len(columns):
            raise ValueError(f"data.prompt_field, answer_field and messages_field must differ, got {columns}")


@dataclass
class SamplingConfig:
    """The rollouts of a step: the student samples `samples_per_prompt` answers per prompt."""

    prompts_per_step: int = field(default=16, metadata={"help": "global: over all processes under torchrun"})
    samples_per_prompt: int = field(default=4, metadata={"help": "answers the student samples per prompt"})
    rollout_chunk_prompts: int = field(
        default=0,
        metadata={
            "help": (
                "prompts per generate call (a memory bound). 0: each process samples its share of the step in one "
                "call. Every row draws from its own seed, so 1 or K processes draw the same rollouts either way; "
                "with chunks (dealt to processes) they also batch the same rows together: bit-identical rollouts. "
                "Also the most prompts' rollouts a teacher continues in one call under fire.filter_mode verified"
            )
        },
    )
    max_new_tokens: int = field(default=16, metadata={"help": "the longest answer, in tokens"})
    temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature, also used for every log-prob and entropy"}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling: the smallest set of tokens with this much probability"}
    )

    def __post_init__(self) -> None:
        _at_least("sampling", self, ("prompts_per_step", "samples_per_prompt", "max_new_tokens"), 1)
        _at_least("sampling", self, ("rollout_chunk_prompts",), 0)
        _in_range("sampling", "temperature", self.temperature, 0.0, math.inf, open_low=True)
        _in_range("sampling", "top_p", self.top_p, 0.0, 1.0, open_low=True)
        if self.rollout_chunk_prompts and self.prompts_per_step % self.rollout_chunk_prompts:
            raise ValueError(
                f"sampling.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"sampling.rollout_chunk_prompts ({self.rollout_chunk_prompts})"
            )

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@dataclass
class LossConfig:
    """The training signal on the selected tokens."""

    objective: str = field(
        default="full_vocab",
        metadata={
            "help": (
                '"full_vocab": the exact per-token divergence (TRL\'s DistillationTrainer; the default: it won on'
                " both demo settings' validation splits); \"sampled\": the PPO surrogate on the sampled token's "
                "advantage (the paper, verl)"
            )
        },
    )
    divergence: str = field(default="reverse_kl", metadata={"help": "full_vocab only: reverse_kl | forward_kl | jsd"})
    jsd_beta: float = field(
        default=0.5, metadata={"help": "full_vocab with divergence=jsd: 0 = forward KL, 1 = reverse KL (TRL / Liger)"}
    )
    clip_ratio: float = field(default=0.2, metadata={"help": "PPO epsilon (sampled)"})
    agg_mode: str = field(
        default="token-mean", metadata={"help": "token-mean | seq-mean-token-mean | seq-mean-token-sum"}
    )
    stats_scope: str = field(
        default="batch",
        metadata={
            "help": (
                '"batch": FiRe statistics over the whole rollout batch; "micro_batch": per micro-batch, as the '
                "authors' released code does"
            )
        },
    )

    def __post_init__(self) -> None:
        _choice("loss", "objective", self.objective, OBJECTIVES)
        _choice("loss", "divergence", self.divergence, DIVERGENCES)
        _choice("loss", "agg_mode", self.agg_mode, LOSS_AGG_MODES)
        _choice("loss", "stats_scope", self.stats_scope, ("batch", "micro_batch"))
        _in_range("loss", "jsd_beta", self.jsd_beta, 0.0, 1.0)
        _in_range("loss", "clip_ratio", self.clip_ratio, 0.0, 1.0)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay; micro-batches accumulate to one step."""

    steps: int = field(default=100, metadata={"help": "optimizer steps (one rollout batch each)"})
    lr: float = field(default=1e-4, metadata={"help": "the peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay"})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW's (beta1, beta2)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup, then cosine decay to min_lr_ratio * lr"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine decay ends at min_lr_ratio * lr"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm (over every process) to this"})
    micro_batch_size: int = field(default=32, metadata={"help": "rollouts per forward/backward"})
    max_skipped_steps: int = field(
        default=10,
        metadata={
            "help": (
                "a step whose loss or gradient norm is not finite changes no weight or optimizer state and is "
                "counted (train/skipped_steps); this many in a row stop the run"
            )
        },
    )
    master_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "a bf16 / fp16 student trains through float32 master weights kept by the optimizer "
                "(fire_opd/train/optim.py); false updates the low-precision weights in place, which loses every "
                "update smaller than a weight's rounding step"
            )
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        _at_least("optim", self, ("steps", "micro_batch_size", "max_skipped_steps"), 1)
        _at_least("optim", self, ("warmup_steps",), 0)
        _in_range("optim", "lr", self.lr, 0.0, math.inf, open_low=True)
        _in_range("optim", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


@dataclass
class ParallelConfig:
    """How processes share the work under torchrun (ignored in a single process)."""

    student: str = field(
        default="ddp",
        metadata={
            "help": (
                '"ddp" (every process holds the student) or "fsdp" (FSDP2: each holds 1 / K of the student\'s '
                "parameters, gradients and optimizer state)"
            )
        },
    )
    teachers: str = field(
        default="replicate",
        metadata={
            "help": (
                '"replicate" (each process scores its own rollouts with a whole teacher, no communication) or '
                '"fsdp" (FSDP2: 1 / K of each teacher per process, gathered layer by layer for every forward; for'
                " a teacher that does not fit one device)"
            )
        },
    )
    vocab: bool = field(
        default=False,
        metadata={
            "help": (
                "each process holds 1 / K of the rows of the student's and every teacher's lm_head (and of the "
                "student's head gradient and AdamW state); statistics run over all processes' tokens "
                "(parallel/sharded_head.py); needs student: ddp, runtime.fused_update and untied heads"
            )
        },
    )

    def __post_init__(self) -> None:
        _choice("parallel", "student", self.student, ("ddp", "fsdp"))
        _choice("parallel", "teachers", self.teachers, ("replicate", "fsdp"))
        if self.vocab and (self.student != "ddp" or self.teachers != "replicate"):
            raise ValueError(
                "parallel.vocab: true runs with parallel.student: ddp and parallel.teachers: replicate (FSDP2 "
                "shards the lm_heads its own way)"
            )


@dataclass
class RuntimeConfig:
    """Where and how the kernels run."""

    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    threads: int = field(
        default=0,
        metadata={
            "help": (
                "torch CPU threads (0: torch's default). CPU reductions, and so a run's numbers, depend on it: fix "
                "it to reproduce a seed"
            )
        },
    )
    backend: str = field(default="auto", metadata={"help": "fire_kernels backend: auto | triton | chunked | reference"})
    fused_update: bool = field(
        default=True, metadata={"help": "form the student's gradients in the forward sweep (fire_kernels.fused_update)"}
    )

    def __post_init__(self) -> None:
        _at_least("runtime", self, ("threads",), 0)
        _choice("runtime", "backend", self.backend, KERNEL_BACKENDS)


@dataclass
class EvalConfig:
    """Held-out evaluation during training: eval/accuracy is avg@samples, plus eval/pass@k."""

    every: int = field(default=20, metadata={"help": "steps between evaluations; 0: only at the end"})
    at_start: bool = field(
        default=True, metadata={"help": "evaluate the initial student before step 1 (a metrics row with train/step 0)"}
    )
    size: int = field(default=256, metadata={"help": "held-out problems (the first `size` of data.eval_prompts)"})
    samples: int = field(default=1, metadata={"help": "completions per problem"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy (then samples must be 1)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling in evaluation"})

    def __post_init__(self) -> None:
        _at_least("eval", self, ("every", "size"), 0)
        _at_least("eval", self, ("samples",), 1)
        _in_range("eval", "temperature", self.temperature, 0.0, math.inf)
        _in_range("eval", "top_p", self.top_p, 0.0, 1.0, open_low=True)
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(
                f"eval.samples={self.samples} needs eval.temperature > 0 (greedy decoding would repeat one completion)"
            )


@dataclass
class CheckpointConfig:
    """Checkpoints in output_dir: step-NNNNNN/ and final/ (Hugging Face format plus the trainer state)."""

    save_every: int = field(default=0, metadata={"help": "0: only the final checkpoint"})
    keep_last: int = field(
        default=0, metadata={"help": 'keep only the newest N step-* checkpoints ("final" is always kept); 0: keep all'}
    )
    resume_from: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                '"latest" (the newest complete checkpoint in output_dir) or a checkpoint directory written by '
                "this trainer"
            )
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace a run already in output_dir (otherwise a new run there is refused)"}
    )
    allow_config_change: bool = field(
        default=False,
        metadata={
            "help": (
                "resume although a field that defines the run changed (RUN_DEFINING): the changes are logged and "
                "kept in output_dir/config-history.jsonl"
            )
        },
    )

    def __post_init__(self) -> None:
        _at_least("checkpoint", self, ("save_every", "keep_last"), 0)


REPORT_TO = ("tensorboard", "wandb")


@dataclass
class LoggingConfig:
    """Metrics: output_dir/metrics.jsonl always, the trackers of `report_to`, the progress bar."""

    every: int = field(default=1, metadata={"help": "steps between metrics rows (the last step is always logged)"})
    report_to: Union[str, list] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={
            "help": (
                "also send the metrics to: tensorboard (output_dir/tensorboard), wandb (Weights & Biases; project"
                ' $WANDB_PROJECT or "fire-opd", WANDB_MODE=offline to sync later), "all", or "none" / []'
            )
        },
    )
    tensorboard: Optional[bool] = field(
        default=None, metadata={"help": "deprecated: logging.report_to (true adds tensorboard, false removes it)"}
    )
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})

    def __post_init__(self) -> None:
        _at_least("logging", self, ("every",), 0)
        targets = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"logging.report_to must be a name or a list of names, got {self.report_to!r}")
        targets = list(REPORT_TO) if targets == ["all"] else [] if targets == ["none"] else list(targets)
        unknown = [t for t in targets if t not in REPORT_TO]
        if unknown:
            raise ValueError(f"logging.report_to: {unknown[0]!r} is not one of {', '.join(REPORT_TO)}, all, none")
        if self.tensorboard is not None:
            logger.warning("config: logging.tensorboard is deprecated, use logging.report_to")
            targets = [t for t in targets if t != "tensorboard"] + (["tensorboard"] if self.tensorboard else [])
            self.tensorboard = None
        self.report_to = targets


SECTIONS: dict[str, type] = {
    "models": ModelsConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "sampling": SamplingConfig,
    "loss": LossConfig,
    "fire": FireOptions,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
    "runtime": RuntimeConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
TOP_LEVEL = ("preset", "seed", "output_dir")

# Named configurations: the fields a preset sets come first, the user's own keys override them
# (each one that does is named in one warning line).
PRESETS: dict[str, dict[str, Any]] = {
    # FiRe-OPD as the authors released it: the sampled objective, one rollout per prompt, and the
    # filter and weights computed inside each actor micro-batch of one rollout. The quantile of one
    # trajectory's score keeps it, so the filter drops nothing and the token weights (entropies
    # normalized by the micro-batch's maxima) do all the work.
    "fire-released": {
        "fire.method": "fire",
        "loss.objective": "sampled",
        "loss.stats_scope": "micro_batch",
        "sampling.samples_per_prompt": 1,
        "optim.micro_batch_size": 1,
    },
}


@dataclass
class TrainConfig:
    """Everything a FiRe-OPD run needs, by section; each field's `help` metadata is its
    documentation (`fire-opd train --help` and the training page's field table are made from it)."""

    models: ModelsConfig = field(default_factory=ModelsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    fire: FireOptions = field(default_factory=FireOptions)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preset: Optional[str] = field(
        default=None,
        metadata={
            "help": "a named configuration under your own keys: fire-released (FiRe-OPD as the authors released it: "
            "sampled objective, one rollout per prompt, statistics per micro-batch of one)"
        },
    )
    seed: int = field(default=0, metadata={"help": "the seed of the rollouts, the prompt order and the initialization"})
    output_dir: str = field(default="runs/fire-opd", metadata={"help": "where the run writes its logs and checkpoints"})

    def __post_init__(self) -> None:
        """Checks that span sections (each section checks its own fields)."""
        if self.parallel.teachers == "fsdp" and not self.runtime.fused_update:
            raise ValueError(
                "parallel.teachers: fsdp needs runtime.fused_update: true (the unfused backward would read the "
                "teacher's lm_head after its shards were released)"
            )
        if self.lora.enabled and self.parallel.student == "fsdp":
            raise ValueError("lora.r > 0 needs parallel.student: ddp (FSDP of a LoRA student is not supported)")
        if self.parallel.vocab and not self.runtime.fused_update:
            raise ValueError(
                "parallel.vocab: true needs runtime.fused_update: true (each lm_head shard's gradient over every "
                "process's tokens is formed in the fused sweep)"
            )
        if self.parallel.vocab and self.loss.stats_scope != "batch":
            raise ValueError(
                "parallel.vocab: true needs loss.stats_scope: batch (the loss covers every process's tokens, so its "
                "per-token weights must be the batch's)"
            )
        if self.fire.filter_mode == "verified":
            # each process lets its own teachers finish its own flagged rollouts, before the update
            if self.loss.stats_scope != "batch":
                raise ValueError(
                    "fire.filter_mode: verified needs loss.stats_scope: batch (it verifies before the update)"
                )
            if self.parallel.teachers != "replicate" or self.parallel.vocab:
                raise ValueError(
                    "fire.filter_mode: verified needs parallel.teachers: replicate and parallel.vocab: false (each "
                    "process's teachers generate alone)"
                )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], overrides: Optional[list[str]] = None) -> TrainConfig:
        """A config from a mapping of sections, dotted keys (`optim.lr`) or the earlier flat keys
        (`lr`, with one warning line), then `key=value` overrides (`--set`; later wins)."""
        values, deprecated = flatten_keys(data)
        for item in overrides or []:
            key, value, old = parse_override(item)
            values[key] = value
            if old:
                deprecated.append((old, key))
        if deprecated:
            logger.warning(
                "config: flat keys are deprecated, write them in their sections: %s",
                ", ".join(f"{old} -> {new}" for old, new in dict(deprecated).items()),
            )
        preset = PRESETS.get(values.get("preset") or "", {})
        overridden = [key for key, value in preset.items() if key in values and values[key] != value]
        if overridden:
            logger.warning(
                "config: your keys override preset %s's: %s",
                values["preset"],
                ", ".join(f"{key}={values[key]!r} (preset: {preset[key]!r})" for key in overridden),
            )
        return cls._build(values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Optional[list[str]] = None) -> TrainConfig:
        """A config from a YAML file (see `from_dict`); errors name the file."""
        data = read_yaml(path)
        try:
            return cls.from_dict(data, overrides)
        except UnknownKey as exc:
            raise UnknownKey(f"{path}: {exc}") from None

    def updated(self, values: Mapping[str, Any]) -> TrainConfig:
        """A copy with some fields changed, by dotted key: `cfg.updated({"optim.lr": 1e-3})`."""
        merged, _ = flatten_keys(self.to_dict())
        new, _ = flatten_keys(values)
        preset = PRESETS.get(new.get("preset") or "", {})  # a preset given here sets its fields under `values`
        return type(self)._build({**merged, **preset, **new})

    @classmethod
    def _build(cls, values: dict[str, Any]) -> TrainConfig:
        name = values.get("preset")
        if name is not None:
            if name not in PRESETS:
                raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
            values = {**PRESETS[name], **values}  # the user's own keys win
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        top: dict[str, Any] = {}
        for key, value in values.items():
            section, _, name = key.rpartition(".")
            hint = _hint(key)
            value = _coerce(key, value, hint)
            (sections[section] if section else top)[name] = value
        built = {}
        for name, section_cls in SECTIONS.items():
            try:
                built[name] = section_cls(**sections[name])
            except ValueError as exc:
                message = str(exc)
                # FireOptions names its fields without the section
                raise ValueError(
                    message if name != "fire" or message.startswith("fire.") else f"fire.{message}"
                ) from None
        return cls(**built, **top)

    def changes_from(self, saved: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """(key, saved value, this value) for each field that defines the run (`RUN_DEFINING`) and
        differs from `saved`, a config as a checkpoint holds it (sections, or the flat keys of
        earlier versions)."""
        try:
            before, _ = flatten_keys(saved)
        except UnknownKey:  # written by another version: compare the keys both know
            before = {}
            for key, value in saved.items():
                try:
                    before.update(flatten_keys({key: value})[0])
                except UnknownKey:
                    continue
        now, _ = flatten_keys(self.to_dict())
        out = []
        for key, value in now.items():
            if key.split(".")[0] in RUN_DEFINING and key in before and _comparable(before[key]) != _comparable(value):
                out.append((key, before[key], value))
        return out

    def to_dict(self) -> dict:
        """Sections as nested mappings (what config.json and checkpoints hold)."""
        out = dataclasses.asdict(self)
        out["optim"]["adam_betas"] = list(self.optim.adam_betas)
        return out


# The sections (and top-level fields) that define a run: a resume that changes one of them is not
# the same run (logging, evaluation, checkpoints, the runtime and the process layout may change).
RUN_DEFINING = ("models", "lora", "data", "sampling", "loss", "fire", "optim", "seed")


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class UnknownKey(ValueError):
    """A config key that names no field."""


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; ValueError naming the file (and line) otherwise."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


# the flat keys of fire-opd <= 0.1 and where they live now
LEGACY_KEYS: dict[str, str] = {
    **{k: f"models.{k}" for k in ("student", "teachers", "tokenizer", "default_teacher", "dtype", "teacher_dtype")},
    "gradient_checkpointing": "models.gradient_checkpointing",
    **{k: f"data.{k}" for k in ("prompts", "eval_prompts", "chat_template_kwargs", "verifier")},
    **{
        k: f"sampling.{k}"
        for k in (
            "prompts_per_step",
            "samples_per_prompt",
            "rollout_chunk_prompts",
            "max_new_tokens",
            "temperature",
            "top_p",
        )
    },
    **{k: f"loss.{k}" for k in ("objective", "divergence", "jsd_beta", "clip_ratio", "stats_scope")},
    "loss_agg_mode": "loss.agg_mode",
    **{f.name: f"fire.{f.name}" for f in dataclasses.fields(FireOptions)},
    **{f.name: f"optim.{f.name}" for f in dataclasses.fields(OptimConfig)},
    "parallel": "parallel.student",
    "teacher_parallel": "parallel.teachers",
    "vocab_parallel": "parallel.vocab",
    **{k: f"runtime.{k}" for k in ("device", "threads", "backend", "fused_update")},
    **{f"eval_{k}": f"eval.{k}" for k in ("every", "size", "samples", "temperature", "top_p")},
    **{k: f"checkpoint.{k}" for k in ("save_every", "keep_last", "resume_from", "overwrite")},
    "log_every": "logging.every",
    "tensorboard": "logging.tensorboard",
    "progress": "logging.progress",
}


def dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys of earlier versions spelled as dotted keys (`{"lr": 1e-3}` -> `{"optim.lr": 1e-3}`)."""
    return {LEGACY_KEYS.get(key, key): value for key, value in values.items()}


def field_names() -> list[str]:
    """Every config key: the dotted names and the top-level ones."""
    return [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)] + list(TOP_LEVEL)


# Names users bring from other trainers (transformers' TrainingArguments, TRL, verl) -> our field's name
FIELD_ALIASES = {
    "learning_rate": "lr", "max_steps": "steps", "num_train_steps": "steps", "total_steps": "steps",
    "total_training_steps": "steps", "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps",
    "lr_warmup_steps": "warmup_steps", "batch_size": "micro_batch_size", "per_device_train_batch_size":
    "micro_batch_size", "max_norm": "max_grad_norm", "grad_clip": "max_grad_norm", "gradient_clipping":
    "max_grad_norm", "clip_grad_norm": "max_grad_norm", "betas": "adam_betas", "max_completion_length":
    "max_new_tokens", "response_length": "max_new_tokens", "max_tokens": "max_new_tokens", "num_generations":
    "samples_per_prompt", "rollout_n": "samples_per_prompt", "eval_steps": "every", "save_steps": "save_every",
    "logging_steps": "every", "model": "student", "teacher": "teachers", "teacher_model": "teachers",
    "loss_agg_mode": "agg_mode", "epsilon": "clip_ratio", "clip_range": "clip_ratio", "bf16": "dtype",
}  # fmt: skip


def _did_you_mean(key: str) -> str:
    """A suggestion for an unknown key: its alias from another trainer, else the closest name
    in its own section, else the closest key anywhere."""
    section, _, name = key.rpartition(".")
    names = field_names()
    target = FIELD_ALIASES.get(name)
    if target is not None:
        candidates = [f for f in names if f.rpartition(".")[2] == target]
        same = [f for f in candidates if f.rpartition(".")[0] == section]
        if same or candidates:
            return f" (did you mean {(same or candidates)[0]!r}?)"
    if section in SECTIONS:
        own = [f.rpartition(".")[2] for f in names if f.rpartition(".")[0] == section]
        close = difflib.get_close_matches(name, own, n=1, cutoff=0.6)
        if close:
            return f" (did you mean {section + '.' + close[0]!r}?)"
    close = difflib.get_close_matches(key, names + list(LEGACY_KEYS), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolve(key: str) -> tuple[str, Optional[str]]:
    """(dotted key, the deprecated flat key it was given as, or None); UnknownKey otherwise."""
    key = key.strip().replace("-", "_")
    if key in TOP_LEVEL or key in _FIELD_SET:
        return key, None
    if key in LEGACY_KEYS:
        return LEGACY_KEYS[key], key
    raise UnknownKey(f"unknown config field {key!r}{_did_you_mean(key)}; fire-opd train --help lists every field")


def flatten_keys(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Dotted keys from sections, dotted keys or flat legacy keys; and the legacy keys met."""
    values: dict[str, Any] = {}
    deprecated: list[tuple[str, str]] = []
    for key, value in data.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, Mapping):  # a section; "parallel: ddp" is the legacy key
            for name, item in value.items():
                dotted, _ = _resolve(f"{key}.{name}")
                values[dotted] = item
            continue
        dotted, old = _resolve(key)
        values[dotted] = value
        if old:
            deprecated.append((old, dotted))
    return values, deprecated


def _hint(key: str) -> Any:
    section, _, name = key.rpartition(".")
    return typing.get_type_hints(SECTIONS[section] if section else TrainConfig)[name]


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `3e-4` as a string and `1` where a float is meant: convert scalars to the
    field's type, with an error that names the field."""
    target = {float: float, int: int, Optional[float]: float, Optional[int]: int}.get(hint)
    if target is None or value is None or isinstance(value, bool):
        return value
    try:
        return target(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {key!r} expects {target.__name__}, got {value!r}") from None


def parse_override(item: str) -> tuple[str, Any, Optional[str]]:
    """`key=value` with the value parsed as YAML (numbers, booleans, lists, mappings); returns
    (dotted key, value, the deprecated flat key or None)."""
    import yaml

    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value")
    raw_key, raw = item.split("=", 1)
    key, old = _resolve(raw_key)
    value = yaml.safe_load(raw)
    hint = _hint(key)
    if hint is str or hint == Optional[str] or typing.get_origin(hint) is typing.Literal:
        value = raw if value is not None or hint is str else None
    return key, value, old


_FIELD_SET = frozenset(field_names())


def field_docs() -> list[tuple[str, str, str]]:
    """(key, default, help) of every config field, section by section, as `fire-opd train --help`
    and the training page list them (from each field's `help` metadata)."""
    rows = []
    for section, cls in [*SECTIONS.items(), ("", TrainConfig)]:
        for f in dataclasses.fields(cls):
            if not section and f.name in SECTIONS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
            rows.append((f"{section}.{f.name}" if section else f.name, json.dumps(default), f.metadata["help"]))
    return rows


def fields_markdown() -> str:
    """The field table of docs/training.md (a test keeps the page equal to it)."""
    lines = ["| field | default | what it does |", "|---|---|---|"]
    for key, default, text in field_docs():
        escaped = text.replace("|", "\\|")  # a Markdown cell
        lines.append(f"| `{key}` | `{default}` | {escaped} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fire_opd.train.config: the table for docs/training.md
    print(fields_markdown())
