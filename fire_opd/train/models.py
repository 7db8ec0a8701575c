"""Loading the student, the teachers and the tokenizer for a run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

import torch
from torch import nn

from fire_opd.ops.heads import lm_head_weight
from fire_opd.train.run_dir import fsync_dir, fsync_tree


def shared_vocabulary(student: nn.Module, teachers: dict[str, nn.Module], tokenizer) -> Optional[int]:
    """The vocabulary the statistics run over: None (every row) when every lm_head has exactly
    the tokenizer's size, else the tokenizer's size. Models pad their heads past it (Qwen2.5-7B
    has 152,064 rows, Qwen2.5-1.5B 151,936, for one tokenizer of 151,665 tokens): those rows are
    left out of every softmax and never sampled. A head smaller than the tokenizer is refused."""
    tokens = len(tokenizer)
    rows = {"the student": lm_head_weight(student, "student").shape[0]}
    rows.update({f"teacher {name!r}": lm_head_weight(t, f"teacher {name!r}").shape[0] for name, t in teachers.items()})
    for who, count in rows.items():
        if count < tokens:
            raise ValueError(
                f"{who} has {count} lm_head rows but the tokenizer has {tokens} tokens; the student and its "
                "teachers must share the tokenizer"
            )
    return None if all(count == tokens for count in rows.values()) else tokens


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Models(NamedTuple):
    student: nn.Module
    teachers: dict[str, nn.Module]
    tokenizer: Any
    vocab_size: Optional[int]  # the shared vocabulary of padded heads (`shared_vocabulary`), or None


def prepare_models(
    config, device: torch.device, *, student=None, teachers: Optional[dict] = None, tokenizer=None, vocab_group=None
) -> Models:
    """(student, teachers, tokenizer, vocab_size) for a TrainConfig: loaded from its paths unless given, on
    `device` and in the configured dtypes (`models.dtype`, `models.teacher_dtype`; also when given),
    teachers frozen, the student with gradient checkpointing if asked.
    With `vocab_group` (vocab_parallel) the models are loaded on the CPU and keep this process's
    rows of their lm_heads before they move to `device`, which never holds a whole head."""
    if not config.models.teachers and teachers is None:
        raise ValueError("no teacher: set config.teachers (name -> path) or pass teachers=")
    dtype = DTYPES[config.models.dtype]
    teacher_dtype = DTYPES[config.models.teacher_dtype or config.models.dtype]
    load_on = torch.device("cpu") if vocab_group is not None else device
    student = student if student is not None else load_causal_lm(config.models.student, dtype=dtype, device=load_on)
    teachers = (
        teachers
        if teachers is not None
        else {
            name: load_causal_lm(path, dtype=teacher_dtype, device=load_on)
            for name, path in config.models.teachers.items()
        }
    )
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.models.tokenizer or config.models.student)
    vocab_size = shared_vocabulary(student, teachers, tokenizer)
    if vocab_group is not None:
        from fire_opd.parallel.sharded_head import shard_lm_heads

        shard_lm_heads(student, teachers, vocab_group, vocab_size)
    # models passed in take the configured dtypes too (a no-op when they already have them)
    student.to(device=device, dtype=dtype)
    if config.lora.enabled:
        student = add_lora(student, config.lora, seed=config.seed)
    for teacher in teachers.values():
        teacher.requires_grad_(False).eval().to(device=device, dtype=teacher_dtype)
    if config.models.gradient_checkpointing:
        # the model's own activation checkpointing; non-reentrant, so the fused update's autograd
        # Functions see ordinary tensors
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.2x
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Models(student, teachers, tokenizer, vocab_size)


def add_lora(student: nn.Module, lora, *, seed: int = 0) -> nn.Module:
    """The student as a peft model whose LoRA adapters (`lora`: a LoraConfig section) are its
    only trainable weights; the base weights are frozen and stay where they are. The adapters'
    random initialization is a function of `seed` alone (the same for any number of processes)."""
    try:
        import peft
    except ImportError:
        raise ImportError("lora.r > 0 needs peft: pip install 'fire-opd[lora]'") from None
    adapters = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    device = next(student.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return peft.get_peft_model(student, adapters)


def is_adapter_folder(path: str | Path) -> bool:
    """A folder written by peft (adapter_config.json, no config.json of its own)."""
    return (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()


def load_causal_lm(
    path: str | Path, *, dtype: torch.dtype | Literal["auto"] = torch.float32, device: str | torch.device = "cpu"
):
    """A causal LM from a model folder or Hub id, in `dtype` ("auto": the dtype its config.json
    records); a LoRA checkpoint (an adapter folder, such as a LoRA run's final/) is loaded onto its
    base model and merged."""
    if is_adapter_folder(path):
        from peft import AutoPeftModelForCausalLM

        model: Any = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype).merge_and_unload()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(torch.device(device))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def save_merged(path: str | Path, *, student, tokenizer) -> Path:
    """A LoRA student's adapters merged into a copy of its weights, written atomically as a plain
    model folder (`from_pretrained` loads it without peft); the student keeps its adapters."""
    import copy

    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    copy.deepcopy(student).merge_and_unload().save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path
