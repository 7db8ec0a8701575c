"""Model plumbing: load causal LMs, check the heads we support, get hidden states without logits.

The fused loss needs `hidden @ lm_head.weight.T` to be the whole head. Heads that add a
bias, soft-cap or scale the logits are refused with a clear error rather than silently
trained on the wrong logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

# Config attributes that change the logits beyond hidden @ W^T (model families that use them).
_UNSUPPORTED_HEAD_ATTRS = {
    "final_logit_softcapping": "final logit soft-capping (Gemma 2 / 3)",
    "logit_scale": "a logit scale (Cohere)",
    "logits_scaling": "logit scaling (Granite)",
    "output_mult": "an output multiplier (muP-style heads)",
}


def lm_head_weight(model: nn.Module, name: str = "model") -> torch.Tensor:
    """The [V, D] output projection, after checking that it is a plain bias-free linear head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{name} has no output embedding (lm_head) weight; expected a causal LM")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{name}'s lm_head has a bias; fire-opd's fused loss supports bias-free heads only")
    config = getattr(model, "config", None)
    for attr, what in _UNSUPPORTED_HEAD_ATTRS.items():
        value = getattr(config, attr, None)
        text_config = getattr(config, "text_config", None)
        value = value if value is not None else getattr(text_config, attr, None)
        if value not in (None, 0, 1, 1.0, False):
            raise ValueError(f"{name} uses {what} ({attr}={value}); the fused loss computes plain "
                             "hidden @ lm_head.weight.T logits and does not support it")
    return head.weight


def check_same_vocab(student: nn.Module, teachers: dict[str, nn.Module]) -> None:
    vocab = lm_head_weight(student, "student").shape[0]
    for name, teacher in teachers.items():
        t_vocab = lm_head_weight(teacher, f"teacher {name!r}").shape[0]
        if t_vocab != vocab:
            raise ValueError(f"vocab mismatch: teacher {name!r} has V={t_vocab} but the student has V={vocab}; "
                             "teachers must share the student's vocabulary (and tokenizer)")


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


def build_char_tokenizer(alphabet: str, save_dir: Optional[str | Path] = None):
    """A character-level Hugging Face tokenizer (`tokenizers` WordLevel model): one token per
    character of `alphabet` plus <pad>, <eos>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left")
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
