"""Model plumbing: load causal LMs, read their output heads, get hidden states without logits.

The fused loss computes the logits from the final hidden states and the head
(DESIGN.md, "Heads"): softcap * tanh(((h W^T + b) * scale) / softcap). `lm_head` reads W, the
bias and the scale / soft-cap from the Hugging Face config of each family that has one;
anything else that changes the logits is refused with a clear error rather than trained on the
wrong logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

@dataclass(frozen=True)
class LMHead:
    """A causal LM's output head as the kernels take it:
    logits = logit_softcap * tanh(((h @ weight.T + bias) * logit_scale) / logit_softcap).

    Every fire_opd function that takes a `*_weight` also takes an LMHead in its place."""

    weight: torch.Tensor  # [V, D]
    bias: Optional[torch.Tensor] = None  # [V]
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None

    def to(self, dtype: torch.dtype) -> "LMHead":
        """Weight and bias in `dtype` (differentiable casts: gradients reach the parameters)."""
        return LMHead(self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype), self.logit_scale,
                      self.logit_softcap)

    def kernel_kwargs(self, prefix: str = "") -> dict:
        """The head's keyword arguments of `fire_kernels` (`prefix="teacher_"` for a teacher)."""
        return {f"{prefix}bias": self.bias, f"{prefix}logit_scale": self.logit_scale,
                f"{prefix}logit_softcap": self.logit_softcap}


WeightOrHead = Union[torch.Tensor, LMHead]


def as_head(weight_or_head: WeightOrHead) -> LMHead:
    return weight_or_head if isinstance(weight_or_head, LMHead) else LMHead(weight_or_head)


# Config attributes that change the logits beyond the head above (model families that use them).
_UNSUPPORTED_HEAD_ATTRS = {
    "output_mult": "an output multiplier (muP-style heads)",
}


def _config_value(config, attr: str):
    value = getattr(config, attr, None)
    return value if value is not None else getattr(getattr(config, "text_config", None), attr, None)


def lm_head(model: nn.Module, name: str = "model") -> LMHead:
    """The output head of a Hugging Face causal LM: weight [V, D], bias, and the logit scale /
    soft-cap of the families that have one (Gemma 2 / 3 `final_logit_softcapping`, Cohere
    `logit_scale`, Granite `logits_scaling`, which divides)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{name} has no output embedding (lm_head) weight; expected a causal LM")
    config = getattr(model, "config", None)
    for attr, what in _UNSUPPORTED_HEAD_ATTRS.items():
        value = _config_value(config, attr)
        if value not in (None, 0, 1, 1.0, False):
            raise ValueError(f"{name} uses {what} ({attr}={value}); fire-opd's fused loss supports a bias, a logit "
                             "scale and a final soft-cap, not this")
    scale = 1.0
    if _config_value(config, "logit_scale") not in (None, False):  # Cohere: logits * logit_scale
        scale *= float(_config_value(config, "logit_scale"))
    if _config_value(config, "logits_scaling") not in (None, False):  # Granite: logits / logits_scaling
        scale /= float(_config_value(config, "logits_scaling"))
    softcap = _config_value(config, "final_logit_softcapping")
    return LMHead(head.weight, getattr(head, "bias", None), scale, float(softcap) if softcap else None)


def lm_head_weight(model: nn.Module, name: str = "model") -> torch.Tensor:
    """The [V, D] output projection (see `lm_head` for the whole head)."""
    return lm_head(model, name).weight


def check_same_vocab(student: nn.Module, teachers: dict[str, nn.Module]) -> None:
    vocab = lm_head_weight(student, "student").shape[0]
    for name, teacher in teachers.items():
        t_vocab = lm_head_weight(teacher, f"teacher {name!r}").shape[0]
        if t_vocab != vocab:
            raise ValueError(f"vocab mismatch: teacher {name!r} has V={t_vocab} but the student has V={vocab}; "
                             "teachers must share the student's vocabulary (and tokenizer)")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prepare_models(config, device: torch.device, *, student=None, teachers: Optional[dict] = None, tokenizer=None,
                   vocab_group=None):
    """(student, teachers, tokenizer) for a TrainConfig: loaded from its paths unless given, on
    `device`, teachers frozen in `teacher_dtype`, the student with gradient checkpointing if asked.
    With `vocab_group` (vocab_parallel) the models are loaded on the CPU and keep this process's
    rows of their lm_heads before they move to `device`, which never holds a whole head."""
    if not config.teachers and teachers is None:
        raise ValueError("no teacher: set config.teachers (name -> path) or pass teachers=")
    dtype = DTYPES[config.dtype]
    teacher_dtype = DTYPES[config.teacher_dtype or config.dtype]
    load_on = torch.device("cpu") if vocab_group is not None else device
    student = student if student is not None else load_causal_lm(config.student, dtype=dtype, device=load_on)
    teachers = teachers if teachers is not None else {
        name: load_causal_lm(path, dtype=teacher_dtype, device=load_on) for name, path in config.teachers.items()}
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer or config.student)
    check_same_vocab(student, teachers)
    if vocab_group is not None:
        from .sharded_head import shard_lm_heads

        shard_lm_heads(student, teachers, vocab_group)
    student.to(device)
    for teacher in teachers.values():
        teacher.requires_grad_(False).eval().to(device)
    if config.gradient_checkpointing:
        # the model's own activation checkpointing; non-reentrant, so the fused update's autograd
        # Functions see ordinary tensors
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.2x
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student, teachers, tokenizer


def decoder(model: nn.Module) -> nn.Module:
    """The backbone that returns final (normed) hidden states, without the LM head."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"cannot find the decoder of {type(model).__name__} (expected a *ForCausalLM with "
                         "a base_model); wrap it or pass hidden states yourself")
    return base


def response_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """Hidden states that predict the response tokens: [B, T_resp, D].

    input_ids = left-padded prompt (prompt_len columns) followed by the response. Position t of
    the result predicts input_ids[:, prompt_len + t]. Position ids follow the attention mask
    (left padding), as `generate` does, so scores match the sampler.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, prompt_len - 1 : -1]


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# The shipped tokenizers' chat template: the messages' contents, concatenated. The tiny demo
# models know only their task alphabet (no role tokens), so a "messages" row
# [{"role": "user", "content": "3+8-4="}] renders to the raw prompt "3+8-4=".
CHAR_CHAT_TEMPLATE = "{%- for message in messages -%}{{ message['content'] }}{%- endfor -%}"


def build_char_tokenizer(alphabet: str, save_dir: Optional[str | Path] = None):
    """A character-level Hugging Face tokenizer (`tokenizers` WordLevel model): one token per
    character of `alphabet` plus <pad>, <eos>, <unk>, with `CHAR_CHAT_TEMPLATE`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tiny_llama(vocab_size: int, hidden: int, layers: int, heads: int, *, seed: int, pad_id: int, eos_id: int,
               max_positions: int = 64):
    """A small LlamaForCausalLM with untied, bias-free head (the demo and test models)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, pad_token_id=pad_id,
                         eos_token_id=eos_id, bos_token_id=None, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
