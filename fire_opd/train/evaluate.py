"""Evaluation: greedy or sampled decoding scored by a verifier, avg@N and unbiased pass@k.

With `samples=N` completions per problem, scores s_ij in [0, 1] from the verifier:

    avg@N   = mean_i mean_j s_ij
    pass@k  = mean_i [1 - C(n_i - c_i, k) / C(n_i, k)]      (Chen et al. 2021, unbiased)

where c_i counts problem i's samples that pass (score 1). pass@1 equals avg@N for a 0/1
verifier. k runs over 1, 2, 4, ... up to N. Greedy decoding is `temperature=0` (then N must
be 1: every sample would be the same).
"""

from __future__ import annotations

from math import comb
from typing import Iterable, Optional

import torch

from fire_opd.train.data import Problem
from fire_opd.train.rollouts import generate_rollouts, rollout_seed
from fire_opd.train.verifiers import Verifier, final_answer, score


def pass_at_k(num_samples: int, num_passed: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples with c passes."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, {num_samples}], got {k}")
    if num_samples - num_passed < k:
        return 1.0
    return 1.0 - comb(num_samples - num_passed, k) / comb(num_samples, k)


def k_values(samples: int) -> list[int]:
    """1, 2, 4, ... up to `samples` (and `samples` itself)."""
    ks, k = [], 1
    while k <= samples:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == samples else ks + [samples]


@torch.no_grad()
def sample_scores(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    verifier: Verifier = final_answer,
    batch_size: int = 256,
    seed: Optional[int] = None,
    progress: bool = False,
    synced_gpus: Optional[bool] = None,
    completions: Optional[list[str]] = None,
) -> torch.Tensor:
    """[problems, samples] verifier scores. Prompts are decoded in batches of `batch_size`
    completions; `seed` makes sampling repeatable. `completions`: a list that receives the
    completions, problem by problem (`samples` each)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if temperature == 0 and samples > 1:
        raise ValueError(
            f"samples={samples} with temperature 0 (greedy) would repeat one completion; "
            "set a temperature > 0 for sampled evaluation"
        )
    from tqdm.auto import tqdm

    flat = [p for p in problems for _ in range(samples)]
    # sample k of problem i draws from its own seed: the same completions for any batch size
    seeds = (
        [rollout_seed(seed, i, k) for i in range(len(problems)) for k in range(samples)] if seed is not None else None
    )
    scores = []
    for start in tqdm(range(0, len(flat), batch_size), disable=not progress, desc="eval", unit="batch"):
        chunk = flat[start : start + batch_size]
        rollouts = generate_rollouts(
            model,
            tokenizer,
            [p.prompt for p in chunk],
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature or 1.0,
            top_p=top_p,
            row_seeds=seeds[start : start + batch_size] if seeds is not None else None,
            synced_gpus=synced_gpus,
        )
        scores += [score(verifier, text, p.answer, p.row or {}) for text, p in zip(rollouts.texts, chunk)]
        if completions is not None:
            completions += rollouts.texts
    return torch.tensor(scores, dtype=torch.float64).view(len(problems), samples)


def summarize(scores: torch.Tensor) -> dict:
    """{"avg@N", "pass@1", "pass@2", ..., "problems"} of a [problems, N] score matrix."""
    problems, samples = scores.shape
    out: dict = {f"avg@{samples}": float(scores.mean()) if problems else 0.0}
    passed = (scores >= 1.0).sum(dim=1).tolist()
    for k in k_values(samples):
        out[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in passed) / problems if problems else 0.0
    out["problems"] = problems
    return out


def evaluate_by_teacher(model, tokenizer, problems: Iterable[Problem], **kwargs) -> dict[str, dict]:
    """`summarize` overall ("all") and per teacher key (when there are several), from one set of
    samples (keyword arguments as `sample_scores`)."""
    problems = list(problems)
    scores = sample_scores(model, tokenizer, problems, **kwargs)
    return summarize_by_teacher(problems, scores)


def summarize_by_teacher(problems: list[Problem], scores: torch.Tensor) -> dict[str, dict]:
    """`summarize` of [problems, samples] scores overall ("all") and per teacher key (when there
    are several)."""
    out = {"all": summarize(scores)}
    keys = sorted({p.teacher for p in problems if p.teacher is not None})
    if len(keys) > 1:
        for key in keys:
            rows = torch.tensor([p.teacher == key for p in problems])
            out[key] = summarize(scores[rows])
    return out


def eval_metrics(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    verifier: Verifier,
    seed: int,
    synced_gpus: Optional[bool] = None,
) -> dict[str, float]:
    """The trainer's evaluation metrics: held-out avg@N as `eval/accuracy` (greedy pass@1 by
    default), pass@k for k > 1, and the same per teacher key (`eval/accuracy_<key>`)."""
    results = evaluate_by_teacher(
        model, tokenizer, problems, samples=samples, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, verifier=verifier, seed=seed, synced_gpus=synced_gpus,
    )  # fmt: skip
    out = {}
    for key, summary in results.items():
        suffix = "" if key == "all" else f"_{key}"
        out[f"eval/accuracy{suffix}"] = summary[f"avg@{samples}"]
        passes = {name: value for name, value in summary.items() if name.startswith("pass@") and name != "pass@1"}
        out.update({f"eval/{name}{suffix}": value for name, value in passes.items()})
    return out


def accuracy(
    model,
    tokenizer,
    problems: Iterable[Problem],
    *,
    batch_size: int = 256,
    max_new_tokens: int = 12,
    verifier: Verifier = final_answer,
) -> float:
    """Mean verifier score of greedy completions (pass@1; 0.0 if there are no problems)."""
    problems = list(problems)
    if not problems:
        return 0.0
    scores = sample_scores(
        model, tokenizer, problems, max_new_tokens=max_new_tokens, verifier=verifier, batch_size=batch_size
    )
    return float(scores.mean())


def accuracy_by_teacher(model, tokenizer, problems: Iterable[Problem], **kwargs) -> dict[str, float]:
    """Greedy accuracy overall ("all") and per routing key (keyword arguments as `accuracy`)."""
    problems = list(problems)
    if not problems:
        return {"all": 0.0}
    return {key: summary["avg@1"] for key, summary in evaluate_by_teacher(model, tokenizer, problems, **kwargs).items()}


def greedy_and_sampled(
    model,
    tokenizer,
    problems: Iterable[Problem],
    *,
    max_new_tokens: int,
    samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    verifier: Verifier = final_answer,
) -> dict:
    """What the demo and the study report for one model, as the field reports it:
    {"accuracy": {key: greedy pass@1}, "sampled": {key: {"avg@N", "pass@1", ..., "pass@N"}}}, overall
    ("all") and per teacher key, the sampled metrics from N completions per problem at the training
    temperature (`seed` fixes them)."""
    problems = list(problems)
    if not problems:
        return {"accuracy": {"all": 0.0}, "sampled": {"all": summarize(torch.zeros(0, samples))}}
    greedy = accuracy_by_teacher(model, tokenizer, problems, max_new_tokens=max_new_tokens, verifier=verifier)
    sampled = evaluate_by_teacher(
        model,
        tokenizer,
        problems,
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        verifier=verifier,
        seed=seed,
    )
    return {"accuracy": greedy, "sampled": sampled}
