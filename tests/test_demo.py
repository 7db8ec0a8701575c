"""The built-in demo and the script that builds its assets, on tiny budgets."""

from __future__ import annotations

import json

import pytest

from fire_opd.build_assets import build, build_chain
from fire_opd.data import TASKS, is_correct, is_well_formed, sample_problems, split_of
from fire_opd.demo import SETTINGS, format_table, run_demo
from fire_opd.models import load_causal_lm, load_tokenizer
from fire_opd.regime import is_looping

REGIME_KEYS = ("initial_reverse_kl_per_token", "mean_response_tokens", "degenerate_rollout_fraction",
               "teacher_entropy_mean")


def test_demo_multi_teacher_runs_end_to_end(tmp_path):
    summary = run_demo("multi-teacher", steps=2, eval_size=12, out_dir=tmp_path, progress=False)
    names = [row["model"] for row in summary["rows"]]
    assert names == ["teacher arith", "teacher reverse", "student (initial)", "student + OPD", "student + FiRe-OPD"]
    assert all(0.0 <= v <= 1.0 for row in summary["rows"] for v in row["accuracy"].values())
    assert {"all", "arith", "reverse"} <= set(summary["rows"][-1]["accuracy"])
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert len(saved["curves"]["fire"]) == 2 and "fire/keep_ratio" in saved["curves"]["fire"][0]
    assert "student + FiRe-OPD" in format_table(summary)
    assert all(key in saved["regime"] for key in REGIME_KEYS)


def test_chain_demo_in_the_papers_regime(tmp_path):
    """The default setting: one family, long worked solutions, a teacher with real entropy."""
    summary = run_demo("chain", steps=2, eval_size=8, out_dir=tmp_path, progress=False, plot=False,
                       objective="full_vocab")
    names = [row["model"] for row in summary["rows"]]
    assert names == ["teacher chain", "student (initial)", "student + OPD", "student + FiRe-OPD"]
    regime = summary["regime"]
    assert regime["initial_reverse_kl_per_token"] <= 1.0  # measured 0.31 nats/token for the shipped pair
    assert regime["mean_response_tokens"] >= 24
    assert regime["teacher_entropy_mean"] > 0.05
    assert 0 < regime["degenerate_rollout_fraction"] < 0.5
    assert summary["objective"] == "full_vocab" and summary["config"]["samples_per_prompt"] == 1


def test_study_quick(tmp_path):
    from fire_opd.study import main

    assert main(["--settings", "single", "--seeds", "0", "--variants", "opd", "fire", "--quick", "--jobs", "1",
                 "--out", str(tmp_path)]) == 0
    table = (tmp_path / "study.md").read_text()
    for row in ("| opd |", "| fire |", "| trl_distillation |", "initial_reverse_kl_per_token"):
        assert row in table
    saved = json.loads((tmp_path / "study.json").read_text())
    fire = [r for r in saved["runs"] if r.get("variant") == "fire"]
    assert fire and "diag/dropped_correct" in fire[0]["diagnostics"]
    assert (tmp_path / "study.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_shipped_teachers_solve_their_tasks(name):
    from fire_opd.build_assets import ASSETS_DIR
    from fire_opd.evaluate import accuracy

    setting = SETTINGS[name]
    tokenizer = load_tokenizer(ASSETS_DIR / setting.tokenizer)
    for task, folder in setting.teachers.items():
        teacher = load_causal_lm(ASSETS_DIR / folder)
        problems = sample_problems([task], 64, seed=9, split="test")
        assert accuracy(teacher, tokenizer, problems, max_new_tokens=setting.recipe.max_new_tokens) >= 0.9


def test_asset_builder_quick(tmp_path):
    report = build(tmp_path, quick=True)
    assert set(report) == {"teacher_arith", "teacher_reverse", "student_init"}
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    model = load_causal_lm(tmp_path / "student_init")
    assert model.config.vocab_size == len(tokenizer)
    report = build_chain(tmp_path / "chain", quick=True)
    assert set(report) == {"teacher", "student_init"} and report["student_init"]["trained_on"] == "teacher samples"
    assert load_causal_lm(tmp_path / "chain" / "student_init").config.hidden_size < \
        load_causal_lm(tmp_path / "chain" / "teacher").config.hidden_size


def test_tasks_and_verifier():
    for task in TASKS:
        for p in sample_problems([task], 20, seed=0, split="train"):
            assert is_correct(p.solution, p.answer)
    assert not set(p.prompt for p in sample_problems(["arith"], 200, seed=0, split="test")) & \
        set(p.prompt for p in sample_problems(["arith"], 2000, seed=0, split="train"))
    assert is_correct(" 11-4=7 ", "7") and not is_correct("11-4=6", "7") and is_correct("31284", "31284")
    splits = [split_of(p) for p in sample_problems(["chain"], 50, seed=0, split="validation")]
    assert set(splits) == {"validation"}
    with pytest.raises(ValueError, match="split must be one of"):
        sample_problems(["arith"], 3, seed=0, split="dev")


def test_chain_solutions_have_several_valid_formats():
    problems = sample_problems(["chain"], 300, seed=0, split="train")
    assert sum(len(p.solution) + 1 for p in problems) / len(problems) >= 24  # tokens, EOS included
    assert all(is_correct(p.solution, p.answer) and is_well_formed(p.solution, "chain") for p in problems)
    layouts = {("," in p.solution, p.solution.count("=") > 2) for p in problems}
    assert len(layouts) >= 3  # rewrite (no comma), steps (comma, many "="), group (comma, few "=")
    assert not is_well_formed("3+8=11,,4", "chain") and not is_well_formed("3+8=", "chain")


def test_degenerate_rollout_kinds():
    assert is_looping("3+8=11=1=1=1=1=1=1=1") and not is_looping("11-4+2-5+7=7+2-5+7=9-5+7=4+7=11")
    assert not is_looping("=1=1")
