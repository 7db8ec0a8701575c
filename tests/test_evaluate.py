"""Verifiers, the unbiased pass@k, sampled evaluation in the trainer, and chat-template rendering."""

from __future__ import annotations

import itertools
import json
from math import comb

import pytest
import torch

from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
from fire_opd.demo.tiny_models import build_char_tokenizer
from fire_opd.train.data import load_prompts, render_prompts
from fire_opd.train.evaluate import k_values, pass_at_k, summarize
from fire_opd.train.verifiers import (
    BUILTIN_VERIFIERS,
    boxed,
    boxed_content,
    final_answer,
    last_number,
    resolve_verifier,
    score,
)


def test_builtin_verifiers():
    assert final_answer("11-4=7", "7") == 1.0 and final_answer("11-4=6", "7") == 0.0
    assert final_answer(" 31284 ", "31284") == 1.0
    assert last_number("so the total is 1,024.", "1024") == 1.0
    assert last_number("x = -3.50 then", "-3.5") == 1.0
    assert last_number("3 apples and 4 pears", "3") == 0.0 and last_number("no digits", "3") == 0.0
    assert boxed_content(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert boxed(r"first \boxed{3} then \boxed{ 4 }.", "4") == 1.0  # the last box counts
    assert boxed(r"\boxed{$12.0$}", "12") == 1.0 and boxed(r"\boxed{12", "12") == 0.0  # cut off inside
    assert boxed(r"\boxed{x+1}", r"\boxed{x + 1}") == 1.0 and boxed("12", "12") == 0.0
    assert set(BUILTIN_VERIFIERS) == {"final_answer", "last_number", "boxed"}


def test_custom_verifier_by_import_path_and_its_checks():
    assert resolve_verifier("fire_opd.train.verifiers:last_number") is last_number
    assert resolve_verifier("boxed") is boxed
    for spec, message in [
        ("nope", "neither a built-in"),
        ("json:nothing", "has no function 'nothing'"),
        ("no_such_pkg.mod:f", "cannot import module 'no_such_pkg.mod'"),
        ("", "must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_verifier(spec)
    with pytest.raises(ValueError, match="must return a number in \\[0, 1\\]"):
        score(lambda text, answer, row: 2.0, "x", "y", {})
    assert score(lambda text, answer, row: row["weight"] * (text == answer), "a", "a", {"weight": 0.5}) == 0.5


def _brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """P(some of k samples drawn without replacement passes), by enumerating all subsets."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_unbiased_estimator(n):
    for passed in range(n + 1):
        outcomes = [True] * passed + [False] * (n - passed)
        for k in range(1, n + 1):
            assert pass_at_k(n, passed, k) == pytest.approx(_brute_force_pass_at_k(outcomes, k))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(10, 3, 2) == pytest.approx(
        1 - comb(7, 2) / comb(10, 2)
    )
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(n, 0, n + 1)


def test_summarize_and_k_values():
    assert k_values(1) == [1] and k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6]
    scores = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    out = summarize(scores)
    assert out["avg@4"] == pytest.approx(6 / 12) and out["pass@1"] == pytest.approx(out["avg@4"])
    assert out["pass@4"] == pytest.approx(2 / 3) and out["problems"] == 3
    assert out["pass@2"] == pytest.approx((1 - comb(2, 2) / comb(4, 2) + 0 + 1) / 3)
    assert summarize(torch.empty(0, 2, dtype=torch.float64)) == {
        "avg@2": 0.0,
        "pass@1": 0.0,
        "pass@2": 0.0,
        "problems": 0,
    }


def test_chat_rows_with_template_kwargs(tmp_path):
    """messages rows are rendered with add_generation_prompt=True and the config's kwargs."""
    tokenizer = build_char_tokenizer(TASK_ALPHABET)
    tokenizer.chat_template = (
        "{%- for m in messages -%}{{ m['content'] }}{%- endfor -%}"
        "{%- if add_generation_prompt and not enable_thinking -%}R{%- endif -%}"
    )
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps(
            {
                "messages": [{"role": "system", "content": "1"}, {"role": "user", "content": "+2="}],
                "answer": "3",
                "source": "x",
            }
        )
        + "\n"
        + json.dumps({"prompt": "4=", "answer": "4"})
    )
    problems = load_prompts(path)
    assert problems[0].prompt == "" and problems[0].row["source"] == "x"
    rendered = render_prompts(problems, tokenizer, {"enable_thinking": False})
    assert [p.prompt for p in rendered] == ["1+2=R", "4="]
    assert render_prompts(problems, tokenizer, {"enable_thinking": True})[0].prompt == "1+2="
    for bad, message in [
        ('{"prompt": "1", "messages": [], "answer": "1"}', "exactly one of 'prompt'"),
        ('{"answer": "1"}', "no column 'prompt' or 'messages'"),
        ('{"prompt": "1", "answer": "1"}\n{"answer": "2"}', r"chat.jsonl:2: give exactly one of 'prompt'"),
        ('{"messages": "hi", "answer": "1"}', "column 'messages' must hold lists of"),
        ('{"messages": [{"role": "user"}], "answer": "1"}', "column 'messages' must hold lists of"),
    ]:
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=message):
            load_prompts(path)


def test_trainer_trains_on_chat_rows_and_evaluates_with_samples(tmp_path):
    """The trainer renders messages rows (the same prompts as raw rows: same rollouts, same loss)
    and periodic evaluation reports avg@N as eval/accuracy plus pass@k."""
    from fire_opd.demo.tiny_models import tiny_llama
    from fire_opd.train.config import TrainConfig
    from fire_opd.train.trainer import FireOPDTrainer

    tokenizer = build_char_tokenizer(TASK_ALPHABET)
    raw = sample_problems(["arith"], 12, seed=0, split="train")
    chat = [type(p)("", p.answer, p.teacher, messages=({"role": "user", "content": p.prompt},)) for p in raw]
    histories = []
    for name, problems in (("raw", raw), ("chat", chat)):
        config = TrainConfig.from_dict(
            {
                "output_dir": str(tmp_path / name),
                "optim.steps": 2,
                "sampling.prompts_per_step": 4,
                "sampling.samples_per_prompt": 2,
                "sampling.max_new_tokens": 6,
                "optim.warmup_steps": 1,
                "eval.every": 2,
                "eval.size": 6,
                "eval.samples": 4,
                "eval.temperature": 1.0,
                "logging.progress": False,
                "logging.report_to": [],
                "seed": 1,
                "data.verifier": "fire_opd.train.verifiers:final_answer",
            }
        )
        models = [
            tiny_llama(len(tokenizer), 32, 1, 2, seed=s, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
            for s in (0, 1)
        ]
        trainer = FireOPDTrainer(
            config,
            student=models[0],
            teachers={"arith": models[1]},
            tokenizer=tokenizer,
            train_problems=problems,
            eval_problems=problems[:6],
        )
        histories.append(trainer.train())
    for a, b in zip(*histories):
        assert a["train/loss"] == b["train/loss"] and a["train/reward"] == b["train/reward"]
    last = histories[1][-1]
    assert {"eval/accuracy", "eval/pass@2", "eval/pass@4"} <= set(last)
    assert last["eval/accuracy"] <= last["eval/pass@2"] <= last["eval/pass@4"]
