"""Seeded per-row sampling (fire_opd/train/rollouts.py): a row's response depends on its seed and
its logits only, so processes, batch sizes and generate-call sizes draw the same rollouts; the
draws follow the (temperature, top-p) distribution; padding rows are never drawn."""

from __future__ import annotations

import pytest
import torch

from fire_opd.demo import asset
from fire_opd.demo.tasks import sample_problems
from fire_opd.parallel.distributed import my_prompts
from fire_opd.train.models import load_causal_lm, load_tokenizer
from fire_opd.train.rollouts import SeededSampler, generate_rollouts, rollout_seed, sample_step, uniforms


def _sampler(n: int, **kwargs) -> SeededSampler:
    return SeededSampler([rollout_seed(7, i) for i in range(n)], prompt_len=0, **kwargs)


def test_uniforms_are_uniform_and_differ_by_row_and_position():
    seeds = torch.tensor([rollout_seed(i) for i in range(200_000)])
    u = uniforms(seeds, 3)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert float((counts / len(u) - 0.1).abs().max()) < 0.003  # ~5 sigma of a binomial at n = 200k
    assert float(torch.corrcoef(torch.stack([u, uniforms(seeds, 4)]))[0, 1].abs()) < 0.01
    assert rollout_seed(1, 2, 3) != rollout_seed(1, 3, 2) and 0 <= rollout_seed(-5, 2**70) < 2**63


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_draws_follow_the_tempered_nucleus_distribution(temperature, top_p):
    n = 40_000
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 9.0])  # the last id is a padding row (vocab_size 4)
    out = _sampler(n, temperature=temperature, top_p=top_p, vocab_size=4)(
        torch.zeros(n, 1, dtype=torch.long), logits.repeat(n, 1)
    )
    assert bool((out.isfinite().sum(1) == 1).all())  # one finite score per row: greedy takes it
    drawn = torch.bincount(out.argmax(1), minlength=5).double() / n
    p = torch.softmax(logits[:4].double() / temperature, -1)
    if top_p < 1:  # transformers' TopPLogitsWarper: drop the tail whose mass is <= 1 - top_p
        ascending, order = p.sort()
        p[order[ascending.cumsum(0) <= 1 - top_p]] = 0
        p /= p.sum()
    assert drawn[4] == 0
    assert torch.allclose(drawn[:4], p, atol=0.01), (drawn, p)


def test_tiny_top_p_is_greedy_and_extreme_logits_stay_finite():
    logits = torch.tensor([[0.0, 50.0, -1e4, 3.0], [-3e38, 1.0, 1.0, -3e38]])
    out = _sampler(2, temperature=1.0, top_p=1e-6, vocab_size=4)(torch.zeros(2, 1, dtype=torch.long), logits)
    assert out.argmax(1)[0] == 1 and out.argmax(1)[1] in (1, 2)
    out = _sampler(2, temperature=0.05, top_p=1.0, vocab_size=4)(torch.zeros(2, 1, dtype=torch.long), logits)
    assert out.argmax(1)[0] == 1 and out.argmax(1)[1] in (1, 2)


def test_rollouts_do_not_depend_on_batching_or_process_count():
    tokenizer = load_tokenizer(str(asset("tokenizer")))
    model = load_causal_lm(str(asset("student_init")), device=torch.device("cpu"))
    problems = sample_problems(["arith"], 8, seed=3, split="train")
    common = dict(samples_per_prompt=3, max_new_tokens=10, temperature=1.0, top_p=1.0, seed=5, step=2)
    whole, one = sample_step(model, tokenizer, problems, mine=range(8), per_call=8, **common)
    texts = []
    for rank in range(4):  # 4 processes, each its share in calls of one prompt
        mine, _ = my_prompts(8, 0, rank, 4)
        part, rollouts = sample_step(model, tokenizer, problems, mine=mine, per_call=1, **common)
        texts += rollouts.texts
    assert texts == one.texts and [p.prompt for p in whole] == [p.prompt for p in problems for _ in range(3)]
    assert len(set(one.texts)) > 8  # samples differ within a prompt
    again = generate_rollouts(model, tokenizer, [problems[0].prompt] * 3, max_new_tokens=10, row_seeds=[1, 2, 1])
    assert again.texts[0] == again.texts[2]


def test_prompts_are_dealt_to_processes_or_refused_in_one_line():
    assert my_prompts(16, 0, 1, 4) == (range(4, 8), 4)
    assert my_prompts(16, 2, 1, 4) == (range(4, 8), 2)
    assert my_prompts(16, 0, 0, 1) == (range(0, 16), 16)
    with pytest.raises(ValueError, match=r"prompts_per_step = 16 cannot be dealt evenly to 3 processes in prompts"):
        my_prompts(16, 0, 0, 3)
    with pytest.raises(ValueError, match="in chunks of sampling.rollout_chunk_prompts = 8 prompts; use a number"):
        my_prompts(16, 8, 0, 4)
