"""On-policy sampling with `generate`: left-padded prompts, EOS-terminated responses.

Every sampled row has its own seed, and its t-th token is drawn with the uniform number
u = splitmix64(row seed, t) by inverting the row's (temperature, top-p) distribution:

    token = min { i : sum_{j <= i} p_j > u * sum_j p_j }

so a row's response depends on its seed and its logits only, not on which rows share its batch,
which process samples it, or how a step is cut into `generate` calls. A training row's seed is
`rollout_seed(seed, step, prompt, sample)`, the prompt counted within the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fire_opd.train.data import Problem

_MASK64 = (1 << 64) - 1


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

    def group_ids(self, samples_per_prompt: int) -> torch.Tensor:
        """[B] the step's prompt index of each row (a prompt's rollouts are adjacent)."""
        return torch.arange(len(self), device=self.response_mask.device) // samples_per_prompt

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def tokens(self, rows: torch.Tensor) -> ResponseTokens:
        """The token tensors of the rollouts at `rows` [n] (a micro-batch), what a forward reads."""
        return ResponseTokens(
            torch.cat([self.prompt_ids[rows], self.response_ids[rows]], dim=1),
            torch.cat([self.prompt_mask[rows], self.response_mask[rows].long()], dim=1),
            self.response_ids[rows],
            self.response_mask[rows],
            self.prompt_len,
        )


@dataclass
class ResponseTokens:
    """Some rollouts' tokens as the models take them (no texts: a micro-batch of a step)."""

    input_ids: torch.Tensor  # [n, P + T] prompt (left-padded) then response
    attention_mask: torch.Tensor  # [n, P + T]
    response_ids: torch.Tensor  # [n, T]
    response_mask: torch.Tensor  # [n, T] bool
    prompt_len: int  # P: position P - 1 + t predicts response token t


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True for every token up to and including the first EOS (all tokens if there is none).
    Tokens after it are generate's padding, whatever their id."""
    is_eos = response_ids == eos_token_id
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rollout_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, e.g. (seed, step, prompt, sample); any change of a key
    gives an unrelated seed."""
    h = 0
    for key in keys:
        h = _splitmix64(h ^ (key & _MASK64))
    return h >> 1


# splitmix64's constants as the int64 values with the same bits (torch's int64 arithmetic wraps)
_GOLDEN, _MIX1, _MIX2 = (c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def uniforms(row_seeds: torch.Tensor, position: int) -> torch.Tensor:
    """[B] float64 in [0, 1): splitmix64(seed + position * golden) per row, vectorized on int64
    (wrapping multiplication; logical shifts by masking the sign extension)."""
    offset = ((position + 1) * _GOLDEN) & _MASK64
    x = row_seeds + (offset - (1 << 64) if offset >= 1 << 63 else offset)
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX2
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 11) & ((1 << 53) - 1)).to(torch.float64) * 2.0**-53


class SeededSampler:
    """A logits processor that samples every row from its own seed (module docstring) at
    `temperature` with nucleus `top_p` (as transformers' TopPLogitsWarper: the smallest set of
    tokens whose probability reaches top_p), never a head's padding row (ids >= vocab_size). It
    returns scores whose argmax is the sampled token, so `generate` runs greedily over them."""

    def __init__(
        self,
        row_seeds: Sequence[int],
        *,
        temperature: float,
        top_p: float,
        vocab_size: int,
        prompt_len: int,
        device: torch.device | str = "cpu",
    ):
        self.row_seeds = torch.tensor(list(row_seeds), dtype=torch.int64, device=device)  # moved once, not per token
        self.temperature, self.top_p, self.vocab_size, self.prompt_len = temperature, top_p, vocab_size, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()[:, : self.vocab_size] / self.temperature
        if self.top_p < 1.0:
            ascending, order = torch.sort(logits, dim=-1)
            outside = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            outside[:, -1] = False  # the most likely token always stays
            logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
        cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
        u = uniforms(self.row_seeds, input_ids.shape[1] - self.prompt_len)
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=self.vocab_size - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


class _NoPaddingRows:
    """Greedy decoding's logits processor: a head's padding rows (ids >= vocab_size) never win."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab_size :] = float("-inf")
        return scores


def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    row_seeds: Optional[Sequence[int]] = None,
    synced_gpus: Optional[bool] = None,
) -> Rollouts:
    """Sample one response per prompt, row i from `row_seeds[i]` (default: seeds drawn from
    torch's global generator, so `torch.manual_seed` repeats a call). `synced_gpus=True` keeps
    every process decoding until all are done (each forward is a collective: vocab_parallel's
    lm_head); None lets `generate` decide (it does for FSDP). A model whose head has rows past the
    tokenizer's vocabulary (padding) never samples them."""

    device = next(model.parameters()).device
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    vocab_size = len(tokenizer)
    if do_sample:
        if row_seeds is None:
            row_seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        if len(row_seeds) != len(prompts):
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {len(prompts)} prompts")
        processor: SeededSampler | _NoPaddingRows = SeededSampler(
            row_seeds, temperature=temperature, top_p=top_p, vocab_size=vocab_size, prompt_len=prompt_ids.shape[1],
            device=device,
        )  # fmt: skip
    else:
        processor = _NoPaddingRows(vocab_size)
    out = _generate(
        model, tokenizer, prompt_ids, prompt_mask, processor, max_new_tokens=max_new_tokens, synced_gpus=synced_gpus
    )
    response_ids = out[:, prompt_ids.shape[1] :]
    if response_ids.shape[1] == 0:  # max_new_tokens = 0 or generation stopped at once
        response_ids = torch.full((len(prompts), 1), tokenizer.eos_token_id, device=device)
    response_mask = response_mask_from_eos(response_ids, tokenizer.eos_token_id)
    texts = [
        tokenizer.decode(ids[mask & (ids != tokenizer.eos_token_id)].tolist())
        for ids, mask in zip(response_ids, response_mask)
    ]
    return Rollouts(prompt_ids, prompt_mask, response_ids, response_mask, texts)


def _generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    processor,
    *,
    max_new_tokens: int,
    synced_gpus: Optional[bool] = None,
) -> torch.Tensor:
    """`generate` in eval mode, the token chosen by `processor`'s one finite score (argmax)."""
    from transformers import LogitsProcessorList

    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced_gpus,
        logits_processor=LogitsProcessorList([processor]),
        do_sample=False,  # the processor samples; generate takes its one finite score
        top_k=None,
        top_p=None,
        temperature=None,
    )
    model.train(was_training)
    return out


@torch.no_grad()
def greedy_continuations(model, tokenizer, prefixes: list[torch.Tensor], budgets: list[int]) -> list[torch.Tensor]:
    """The model's greedy continuation of each token-id prefix ([L_i] each), up to its own budget
    of new tokens and its first EOS (included), never a padding row of its head.

    One generate call for all of them, as long as the largest budget: greedy decoding is
    deterministic, so a row's first b tokens are its b-token continuation, and each row is cut to
    its own budget (a call per budget would decode the same tokens in many smaller batches)."""
    if len(budgets) != len(prefixes):
        raise ValueError(f"budgets must give one budget per prefix ({len(prefixes)}), got {len(budgets)}")
    budgets = [max(budget, 0) for budget in budgets]
    longest = max(budgets, default=0)
    if longest <= 0:
        return [prefix.new_empty(0) for prefix in prefixes]
    width = max(len(prefix) for prefix in prefixes)
    device = next(model.parameters()).device
    ids = torch.full((len(prefixes), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for row, prefix in enumerate(prefixes):  # left padding, as for prompts
        ids[row, width - len(prefix) :] = prefix.to(device)
        attention[row, width - len(prefix) :] = 1
    out = _generate(model, tokenizer, ids, attention, _NoPaddingRows(len(tokenizer)), max_new_tokens=longest)
    new = out[:, width:]
    kept = response_mask_from_eos(new, tokenizer.eos_token_id) if new.shape[1] else new.bool()
    return [row[:budget][mask[:budget]] for row, mask, budget in zip(new, kept, budgets)]


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
    mine: range,
    per_call: int,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    step: int,
    synced_gpus: Optional[bool] = None,
) -> tuple[list[Problem], Rollouts]:
    """Step 1 of the loop: this process's rollouts of a step. The step's prompts `mine` (indices
    into `prompts`), `samples_per_prompt` rows each (adjacent), `per_call` prompts per `generate`
    call. Row k of prompt j is sampled from `rollout_seed(seed, step, j, k)`, so a prompt's
    rollouts depend neither on the process count nor on a resume."""
    problems: list[Problem] = []
    parts = []
    for start in range(mine.start, mine.stop, per_call):
        indices = range(start, min(start + per_call, mine.stop))
        rows = [(j, k) for j in indices for k in range(samples_per_prompt)]
        call_problems = [prompts[j] for j, _ in rows]
        parts.append(
            generate_rollouts(
                student,
                tokenizer,
                [p.prompt for p in call_problems],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                row_seeds=[rollout_seed(seed, step, j, k) for j, k in rows],
                synced_gpus=synced_gpus,
            )
        )
        problems += call_problems
    return problems, concat_rollouts(parts, tokenizer.pad_token_id)
