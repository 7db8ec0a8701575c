"""The built-in demo and the script that builds its assets, on tiny budgets."""

from __future__ import annotations

import json

from fire_opd.build_assets import build
from fire_opd.data import TASKS, is_correct, sample_problems
from fire_opd.demo import format_table, run_demo
from fire_opd.models import load_causal_lm, load_tokenizer


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


def test_shipped_teachers_solve_their_tasks():
    from fire_opd.build_assets import ASSETS_DIR
    from fire_opd.evaluate import accuracy

    tokenizer = load_tokenizer(ASSETS_DIR / "tokenizer")
    for task in TASKS:
        teacher = load_causal_lm(ASSETS_DIR / f"teacher_{task}")
        assert accuracy(teacher, tokenizer, sample_problems([task], 64, seed=9, split="test")) >= 0.9


def test_asset_builder_quick(tmp_path):
    report = build(tmp_path, quick=True)
    assert set(report) == {"teacher_arith", "teacher_reverse", "student_init"}
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    model = load_causal_lm(tmp_path / "student_init")
    assert model.config.vocab_size == len(tokenizer)


def test_tasks_and_verifier():
    for task in TASKS:
        for p in sample_problems([task], 20, seed=0, split="train"):
            assert is_correct(p.solution, p.answer)
    assert not set(p.prompt for p in sample_problems(["arith"], 200, seed=0, split="test")) & \
        set(p.prompt for p in sample_problems(["arith"], 2000, seed=0, split="train"))
    assert is_correct(" 11-4=7 ", "7") and not is_correct("11-4=6", "7") and is_correct("31284", "31284")
