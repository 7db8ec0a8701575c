"""fire.filter_mode "verified" in the trainer: the teacher finishes each flagged rollout from the
student's prefix through its first divergence token, and the verifier's verdict decides between
keeping the rollout whole and truncating it there."""

from __future__ import annotations

import pytest
import torch
from test_trainer import _config, _model, _trainer

import fire_opd.train.verify as verify_module
from fire_opd.algorithm.selection import first_divergence
from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
from fire_opd.demo.tiny_models import build_char_tokenizer
from fire_opd.train.trainer import FireOPDTrainer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(TASK_ALPHABET)


RULE = dict(method="filter_only", percentile=60.0, divergence_prob=0.9, steps=1, eval_every=0, eval_size=0)


def _first_step(tmp_path, tokenizer, name, verdict=None, **fields):
    trainer = _trainer(tokenizer, _config(tmp_path / name, **RULE, **fields))
    if verdict is not None:
        trainer.verifier = lambda completion, answer, row: verdict
    return trainer.train()[0]


def test_verified_with_a_wrong_teacher_is_truncate_and_with_a_right_one_keeps_everything(tmp_path, tokenizer):
    truncate = _first_step(tmp_path, tokenizer, "truncate", filter_mode="truncate")
    wrong = _first_step(tmp_path, tokenizer, "wrong", verdict=0.0, filter_mode="verified")
    right = _first_step(tmp_path, tokenizer, "right", verdict=1.0, filter_mode="verified")
    assert truncate["fire/truncated_ratio"] > 0  # the case is not empty
    for key in ("fire/token_keep_ratio", "fire/truncated_ratio", "train/loss"):
        assert wrong[key] == pytest.approx(truncate[key], rel=1e-6), key
    assert right["fire/truncated_ratio"] == 0.0 and right["fire/token_keep_ratio"] == pytest.approx(1.0)
    for metrics in (wrong, right):
        assert metrics["fire/verified_rollouts"] > 0 and metrics["fire/verify_tokens"] > 0
        assert metrics["time/verify_s"] > 0
    assert right["fire/verified_reliable_ratio"] == 1.0 and wrong["fire/verified_reliable_ratio"] == 0.0


@pytest.mark.parametrize("chunk_prompts", [0, 1])
def test_the_teacher_continues_from_the_students_prefix_through_the_divergence(
    tmp_path, tokenizer, monkeypatch, chunk_prompts
):
    """Each flagged rollout is continued from its prompt and response through the divergence
    token, with the budget the sampler had left; all in one generate call, or in calls of the
    sampler's rows (sampling.rollout_chunk_prompts x samples_per_prompt: 1 x 2 here)."""
    seen, real = [], verify_module.greedy_continuations

    def spy(model, tok, prefixes, budgets):
        seen.append(list(zip(prefixes, budgets)))
        return real(model, tok, prefixes, budgets)

    captured = {}
    real_verify = verify_module.verify_flagged

    def capture(rollouts, problems, scores, **kwargs):
        captured.update(rollouts=rollouts, scores=scores, fire=kwargs["fire"], group_ids=kwargs["group_ids"])
        return real_verify(rollouts, problems, scores, **kwargs)

    monkeypatch.setattr(verify_module, "greedy_continuations", spy)
    monkeypatch.setattr("fire_opd.train.trainer.verify_flagged", capture)
    _first_step(tmp_path, tokenizer, "spy", filter_mode="verified", rollout_chunk_prompts=chunk_prompts)
    rollouts, scores = captured["rollouts"], captured["scores"]
    mask = rollouts.response_mask
    flagged = verify_module.flagged_rollouts(scores, mask, captured["fire"], captured["group_ids"])
    cut = first_divergence(scores.teacher_log_prob, mask, 0.9)
    prompts = [rollouts.prompt_ids[i][rollouts.prompt_mask[i].bool()] for i in range(len(rollouts))]
    expected = {  # prompt + response through the divergence token -> the 6 - (cut + 1) tokens left
        tuple(torch.cat([prompts[i], rollouts.response_ids[i, : cut[i] + 1]]).tolist()): 6 - (int(cut[i]) + 1)
        for i in range(len(rollouts))
        if flagged[i] and cut[i] >= 0
    }
    got = {tuple(prefix.tolist()): budget for call in seen for prefix, budget in call}
    assert len(expected) > 1 and got == expected
    if chunk_prompts:
        assert len(seen) > 1 and all(len(call) <= 2 for call in seen)
    else:
        assert len(seen) == 1  # one teacher, one call


def test_greedy_continuations_cut_each_row_to_its_own_budget(tokenizer):
    """One call with per-row budgets gives each row what a call of its own budget gives: greedy
    decoding's first b tokens do not depend on how many more are decoded."""
    from fire_opd.train.rollouts import greedy_continuations

    model = _model(tokenizer, 10, hidden=48)
    problems = sample_problems(["arith"], 5, seed=3, split="train")
    prefixes = [torch.tensor(tokenizer(p.prompt)["input_ids"]) for p in problems]
    budgets = [0, 1, 3, 6, 9]
    together = greedy_continuations(model, tokenizer, prefixes, budgets)
    for prefix, budget, got in zip(prefixes, budgets, together):
        (alone,) = greedy_continuations(model, tokenizer, [prefix], [budget])
        assert len(got) <= budget and torch.equal(got, alone), (budget, got, alone)
    assert any(len(got) > 3 for got in together)  # the longer budgets were used
    with pytest.raises(ValueError, match="budgets must give one budget per prefix \\(5\\), got 4"):
        greedy_continuations(model, tokenizer, prefixes, budgets[:4])


def test_verified_needs_the_batch_statistics_and_replicated_teachers(tmp_path):
    with pytest.raises(ValueError, match="fire.filter_mode: verified needs loss.stats_scope: batch"):
        _config(tmp_path, filter_mode="verified", stats_scope="micro_batch")
    with pytest.raises(ValueError, match="needs parallel.teachers: replicate and parallel.vocab: false"):
        _config(tmp_path, filter_mode="verified", teacher_parallel="fsdp")


def test_verified_with_padded_heads_equals_the_unpadded_run(tmp_path, tokenizer, monkeypatch):
    """Checkpoints pad their heads past the tokenizer. The teacher's greedy continuation (the one
    generation only `verified` runs) must never pick a padding row, even one that would win every
    argmax, and the step must equal the unpadded pair's."""
    from test_padded_vocab import _pad_head

    continuations = []
    real = verify_module.greedy_continuations

    def spy(model, tok, prefixes, max_new_tokens):
        out = real(model, tok, prefixes, max_new_tokens)
        continuations.extend(out)
        return out

    monkeypatch.setattr(verify_module, "greedy_continuations", spy)
    steps = {}
    for name in ("plain", "padded"):
        student, teacher = _model(tokenizer, 0), _model(tokenizer, 10, hidden=48)
        if name == "padded":  # padding rows large enough to win every argmax if they took part
            student, teacher = _pad_head(student, 24, 2), _pad_head(teacher, 40, 3)
        trainer = FireOPDTrainer(
            _config(tmp_path / name, **RULE, filter_mode="verified"), student=student, teachers={"arith": teacher},
            tokenizer=tokenizer, train_problems=sample_problems(["arith"], 40, seed=1, split="train"),
        )  # fmt: skip
        assert trainer.vocab_size == (None if name == "plain" else len(tokenizer))
        steps[name] = trainer.train()[0]
    assert continuations and all(int(c.max()) < len(tokenizer) for c in continuations if c.numel())
    assert steps["padded"]["fire/verified_rollouts"] > 0
    for key in ("train/loss", "fire/token_keep_ratio", "fire/truncated_ratio", "fire/verified_reliable_ratio"):
        assert steps["padded"][key] == pytest.approx(steps["plain"][key], rel=1e-5, abs=1e-6), key
