"""`LMHead`: a causal LM's output head, the one head type every fire_kernels function takes.

    logits = logit_softcap * tanh(((h @ weight.T + bias) * logit_scale) / logit_softcap)

(no tanh when `logit_softcap` is None). Every public function takes either an `LMHead` or a bare
`[V, D]` weight tensor (a plain head: no bias, scale 1, no soft-cap) where it names a `head`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class LMHead:
    """weight [V, D]; bias [V] or None (it gets a gradient when it requires one); logit_scale
    multiplies the logits (Cohere's `logit_scale`; Granite divides by `logits_scaling`: pass its
    reciprocal); logit_softcap None, or Gemma 2 / 3's `final_logit_softcapping`."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None

    def to(self, dtype: torch.dtype) -> LMHead:
        """Weight and bias in `dtype` (differentiable casts: gradients reach the parameters)."""
        return replace(self, weight=self.weight.to(dtype), bias=None if self.bias is None else self.bias.to(dtype))


HeadLike = Union[torch.Tensor, LMHead]


def as_head(head: object, name: str = "head") -> LMHead:
    """`head` as an LMHead (a bare weight tensor is a plain head); a clear error for anything else."""
    if isinstance(head, LMHead):
        return head
    if isinstance(head, torch.Tensor):
        return LMHead(head)
    raise TypeError(f"{name} must be a [V, D] torch.Tensor or a fire_kernels.LMHead, got {type(head).__name__}")
