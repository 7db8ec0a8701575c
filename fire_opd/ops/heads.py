"""What the losses read from a model: its output head and its final hidden states.

The fused loss computes the logits from the final hidden states and the head (docs:
"Kernels"): softcap * tanh(((h W^T + b) * scale) / softcap). `lm_head` reads W, the bias and
the scale / soft-cap from the Hugging Face config of each family that has one; anything else
that changes the logits is refused with a clear error rather than trained on the wrong logits.
"""

from __future__ import annotations

import torch
from torch import nn

from fire_kernels.lm_head import HeadLike, LMHead, as_head

# the one head type: fire_kernels' (a bare [V, D] weight is a plain head wherever a head is taken)
__all__ = ["LMHead", "HeadLike", "as_head", "lm_head", "lm_head_weight", "response_hidden_states"]


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
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{name} has no output embedding (lm_head) weight; expected a causal LM")
    config = getattr(model, "config", None)
    for attr, what in _UNSUPPORTED_HEAD_ATTRS.items():
        value = _config_value(config, attr)
        if value not in (None, 0, 1, 1.0, False):
            raise ValueError(
                f"{name} uses {what} ({attr}={value}); fire-opd's fused loss supports a bias, a logit "
                "scale and a final soft-cap, not this"
            )
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


def is_peft(model: nn.Module) -> bool:
    """Whether `model` is a peft model (a LoRA student), without importing peft."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def decoder(model: nn.Module) -> nn.Module:
    """The backbone that returns final (normed) hidden states, without the LM head (inside a peft
    wrapper too: its adapters live in the backbone's layers)."""
    if is_peft(model):
        model = model.get_base_model()  # type: ignore[operator]  # peft's PeftModel
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(
            f"cannot find the decoder of {type(model).__name__} (expected a *ForCausalLM with "
            "a base_model); wrap it or pass hidden states yourself"
        )
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
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, prompt_len - 1 : -1]
