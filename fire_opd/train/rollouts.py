"""On-policy sampling with `generate`: left-padded prompts, EOS-terminated responses."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from fire_opd.parallel.distributed import chunk_seed
from fire_opd.train.data import Problem


@dataclass
class Rollouts:
    """A batch of sampled responses. input_ids = prompt_ids ++ response_ids."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, T] (after the first EOS: padding)
    response_mask: torch.Tensor  # [B, T] bool, True up to and including the first EOS
    texts: list[str]  # decoded responses, EOS and padding removed

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True for every token up to and including the first EOS (all tokens if there is none).
    Tokens after it are generate's padding, whatever their id."""
    is_eos = response_ids == eos_token_id
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0


@torch.no_grad()
def _outside_the_vocabulary(model, vocab_size: int):
    """A logits processor that rules out the head's padding rows (ids >= the tokenizer's size),
    or None when the head has none."""
    from transformers import LogitsProcessor, LogitsProcessorList

    rows = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(rows, int) or rows <= vocab_size:
        return None

    class NoPaddingRows(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores[:, vocab_size:] = float("-inf")
            return scores

    return LogitsProcessorList([NoPaddingRows()])


def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    synced_gpus: Optional[bool] = None,
) -> Rollouts:
    """Sample one response per prompt. `synced_gpus=True` keeps every process decoding until all
    are done (each forward is a collective: vocab_parallel's lm_head); None lets `generate`
    decide (it does for FSDP). A model whose head has rows past the tokenizer's vocabulary
    (padding) never samples them."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    was_training = model.training
    model.eval()
    sample_args = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if do_sample
        else {"do_sample": False}
    )
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced_gpus,
        logits_processor=_outside_the_vocabulary(model, len(tokenizer)),
        **sample_args,
    )
    model.train(was_training)
    response_ids = out[:, prompt_ids.shape[1] :]
    if response_ids.shape[1] == 0:  # max_new_tokens = 0 or generation stopped at once
        response_ids = torch.full((len(prompts), 1), tokenizer.eos_token_id, device=device)
    response_mask = response_mask_from_eos(response_ids, tokenizer.eos_token_id)
    texts = [
        tokenizer.decode(ids[mask & (ids != tokenizer.eos_token_id)].tolist())
        for ids, mask in zip(response_ids, response_mask)
    ]
    return Rollouts(prompt_ids, prompt_mask, response_ids, response_mask, texts)


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """One batch from several: prompts re-padded on the left, responses on the right (rows keep
    their order). Positions follow the attention mask, so the extra padding changes no score."""
    if len(parts) == 1:
        return parts[0]
    prompt_len = max(p.prompt_ids.shape[1] for p in parts)
    response_len = max(p.response_ids.shape[1] for p in parts)

    def pad(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
        extra = width - x.shape[1]
        fill = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
        return torch.cat([fill, x] if left else [x, fill], dim=1)

    return Rollouts(
        torch.cat([pad(p.prompt_ids, prompt_len, pad_token_id, True) for p in parts]),
        torch.cat([pad(p.prompt_mask, prompt_len, 0, True) for p in parts]),
        torch.cat([pad(p.response_ids, response_len, pad_token_id, False) for p in parts]),
        torch.cat([pad(p.response_mask, response_len, False, False) for p in parts]),
        [t for p in parts for t in p.texts],
    )


def sample_step(
    student,
    tokenizer,
    prompts: list[Problem],
    *,
    chunks: Iterable[int],
    chunk_size: int,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    step: int,
    synced_gpus: Optional[bool] = None,
) -> tuple[list[Problem], Rollouts]:
    """Step 1 of the loop: this process's rollouts of a step. Its `chunks` of the step's prompts,
    `samples_per_prompt` each (adjacent), every chunk sampled with the seed (seed, step, chunk), so
    a chunk's rollouts do not depend on the process count or on a resume."""
    problems: list[Problem] = []
    parts = []
    for chunk in chunks:
        torch.manual_seed(chunk_seed(seed, step, chunk))
        random.seed(chunk_seed(seed, step, chunk))
        chunk_problems = [
            p for p in prompts[chunk * chunk_size : (chunk + 1) * chunk_size] for _ in range(samples_per_prompt)
        ]
        parts.append(
            generate_rollouts(
                student,
                tokenizer,
                [p.prompt for p in chunk_problems],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                synced_gpus=synced_gpus,
            )
        )
        problems += chunk_problems
    return problems, concat_rollouts(parts, tokenizer.pad_token_id)
