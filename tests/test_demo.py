"""The built-in demo and the script that builds its assets, on tiny budgets."""

from __future__ import annotations

import json

import pytest

from fire_opd.demo.build_assets import build, build_chain, build_steps
from fire_opd.demo.recipes import DEMO_VARIANTS
from fire_opd.demo.run import SETTINGS, format_table, row_name, run_demo
from fire_opd.demo.tasks import TASKS, is_correct, sample_problems, split_of
from fire_opd.train.health import is_looping, is_well_formed
from fire_opd.train.models import load_causal_lm, load_tokenizer

REGIME_KEYS = (
    "initial_reverse_kl_per_token",
    "mean_response_tokens",
    "degenerate_rollout_fraction",
    "teacher_entropy_mean",
)


def test_demo_multi_teacher_runs_end_to_end(tmp_path):
    summary = run_demo("multi-teacher", steps=2, eval_size=12, out_dir=tmp_path, progress=False)
    names = [row["model"] for row in summary["rows"]]
    assert names == ["teacher arith", "teacher reverse", "student (initial)", *map(row_name, DEMO_VARIANTS)]
    assert names[3:5] == ["student + OPD", "student + FiRe-OPD"]  # then the recommended rule, if any
    assert all(0.0 <= v <= 1.0 for row in summary["rows"] for v in row["accuracy"].values())
    assert {"all", "arith", "reverse"} <= set(summary["rows"][-1]["accuracy"])
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert len(saved["curves"]["fire"]) == 2 and "fire/keep_ratio" in saved["curves"]["fire"][0]
    assert "student + FiRe-OPD" in format_table(summary)
    assert all(key in saved["regime"] for key in REGIME_KEYS)


def test_default_demo_in_the_papers_regime(tmp_path):
    """The default setting: one family, long worked solutions, a teacher with real entropy; the
    table has greedy and sampled columns and summary.json each row's `sampled` metrics."""
    summary = run_demo(
        steps=2, eval_size=8, out_dir=tmp_path, progress=False, plot=False, samples=4, variants=("opd", "fire")
    )
    assert summary["setting"] == "steps"
    names = [row["model"] for row in summary["rows"]]
    assert names == ["teacher chain", "student (initial)", "student + OPD", "student + FiRe-OPD"]
    regime = summary["regime"]
    assert regime["initial_reverse_kl_per_token"] <= 1.0
    assert regime["mean_response_tokens"] >= 24
    assert regime["teacher_entropy_mean"] > 0.02
    assert 0 < regime["degenerate_rollout_fraction"] < 0.5
    assert summary["objective"] == "full_vocab" and summary["config"]["sampling"]["samples_per_prompt"] == 1
    saved = json.loads((tmp_path / "summary.json").read_text())
    for row in saved["rows"]:
        assert set(row["sampled"]["all"]) == {"avg@4", "pass@1", "pass@2", "pass@4", "problems"}
        assert 0.0 <= row["sampled"]["all"]["pass@1"] <= row["sampled"]["all"]["pass@4"] <= 1.0
        assert row["sampled"]["all"]["avg@4"] == row["sampled"]["all"]["pass@1"]
    table = format_table(summary)
    assert "| model | greedy | avg@4 | pass@4 | steps | tokens/s |" in table


def test_brittle_teacher_is_accurate_on_its_own_solutions_and_wrong_after_a_rewrite():
    """The premise setting's teacher, by construction: it solves in "steps" and never opens a
    rewrite, but continues a correctly started rewrite with the sign-ignoring rule."""
    from fire_opd.demo.build_assets import ASSETS_DIR
    from fire_opd.demo.tasks import chain_rewrite, chain_terms
    from fire_opd.train.rollouts import generate_rollouts

    setting = SETTINGS["brittle-teacher"]
    tokenizer = load_tokenizer(ASSETS_DIR / setting.tokenizer)
    teacher = load_causal_lm(ASSETS_DIR / setting.teachers["chain"])
    problems = [
        p
        for p in sample_problems(["chain"], 200, seed=5, split="test")
        if any(t < 0 for t in chain_terms(p.prompt)[2:])
    ][:64]  # the wrong rule changes the answer
    own = generate_rollouts(teacher, tokenizer, [p.prompt for p in problems], max_new_tokens=44, do_sample=False)
    assert sum(is_correct(t, p.answer) for t, p in zip(own.texts, problems)) >= 0.9 * len(problems)
    # "steps"; a rewrite only where its first token is also a steps solution's (a 0 among the first
    # two terms, so the first fold repeats a term): the format decision was never learned for rewrites
    rewrites = [p for t, p in zip(own.texts, problems) if "," not in t]
    assert len(rewrites) <= 0.1 * len(problems)
    assert all(0 in chain_terms(p.prompt)[:2] for p in rewrites)
    prefixes = [chain_rewrite(chain_terms(p.prompt)).split("=")[0] + "=" for p in problems]  # the first fold, right
    continued = generate_rollouts(
        teacher, tokenizer, [p.prompt + pre for p, pre in zip(problems, prefixes)], max_new_tokens=44, do_sample=False
    )
    wrong_rule = [chain_rewrite(chain_terms(p.prompt), ignore_signs=True) for p in problems]
    follows = sum(pre + t == w for pre, t, w in zip(prefixes, continued.texts, wrong_rule))
    assert follows >= 0.8 * len(problems)
    assert sum(is_correct(pre + t, p.answer) for pre, t, p in zip(prefixes, continued.texts, problems)) <= 0.1 * len(
        problems
    )


def test_cascade_teacher_solves_its_own_chains_and_continues_wrong_after_an_error():
    """The error-cascade teacher, by construction: right on its own chains, and after a running
    value restated wrongly it adds |t| whatever t's sign, from then on."""
    import random

    from fire_opd.demo.build_assets import ASSETS_DIR
    from fire_opd.demo.regime import step_results
    from fire_opd.demo.tasks import chain_steps_after_error, chain_terms
    from fire_opd.train.rollouts import generate_rollouts

    setting = SETTINGS["error-cascade"]
    tokenizer = load_tokenizer(ASSETS_DIR / setting.tokenizer)
    teacher = load_causal_lm(ASSETS_DIR / setting.teachers["chain"])
    chains = sample_problems(["chain"], 200, seed=5, split="test")
    problems = [p for p in chains if any(t < 0 for t in chain_terms(p.prompt)[2:])][:64]
    own = generate_rollouts(teacher, tokenizer, [p.prompt for p in problems], max_new_tokens=44, do_sample=False)
    assert sum(is_correct(t, p.answer) for t, p in zip(own.texts, problems)) >= 0.9 * len(problems)
    rng = random.Random(3)
    solutions = [chain_steps_after_error(chain_terms(p.prompt), rng) for p in problems]
    prefixes = [text[:k] for text, k in solutions]  # through the wrongly restated value
    continued = generate_rollouts(
        teacher, tokenizer, [p.prompt + pre for p, pre in zip(problems, prefixes)], max_new_tokens=44, do_sample=False
    )
    follows = sum(pre + t == text for pre, t, (text, _) in zip(prefixes, continued.texts, solutions))
    assert follows >= 0.8 * len(problems)
    # its steps from the error on are wrong wherever the term is negative: far below a reliable teacher's
    after = [r for pre, t in zip(prefixes, continued.texts) for r in step_results(pre + t)[pre.count(",") :]]
    assert sum(bool(r) for r in after) <= 0.75 * len(after)


def test_error_cascade_solutions_and_the_checkers():
    import random

    from fire_opd.demo.regime import first_copy_error, step_results
    from fire_opd.demo.tasks import chain_steps, chain_steps_after_error

    terms = [3, 8, -4, 2, -5, 7]
    assert step_results(chain_steps(terms)) == [True] * 5 and first_copy_error(chain_steps(terms)) is None
    rng = random.Random(0)
    for _ in range(50):
        text, k = chain_steps_after_error(terms, rng)
        assert first_copy_error(text) == k
        wrong = text[:k].count(",")  # the step that restates the value wrongly
        assert 1 <= wrong <= 3
        steps = [part.split("=") for part in text.split(",")]
        for step in range(wrong, 5):  # from there: the restated value plus |t|
            restated = int(steps[step][0][: len(steps[step][0]) - len(f"{terms[step + 1]:+d}")])
            assert int(steps[step][1]) == restated + abs(terms[step + 1])
    assert step_results("3+8=11,x") == [True, None] and step_results("-2-6=-8,5+5=11") == [True, False]
    assert first_copy_error("3+8=11,4+11=15") is None  # an addition written the other way round
    assert first_copy_error("3+8=11,12-4=8") == len("3+8=11,12")


def test_paired_differences_and_their_interval():
    from fire_opd.demo.study.report import format_paired, paired_difference

    mean, low, high = paired_difference([0.02, 0.04, 0.03])
    assert mean == pytest.approx(0.03) and (low, high) == pytest.approx(
        (0.03 - 4.303 * 0.01 / 3**0.5, 0.03 + 4.303 * 0.01 / 3**0.5)
    )
    runs = [
        {"kind": "train", "setting": "s", "objective": "o", "variant": v, "seed": seed, "accuracy": acc, "sampled": {}}
        for v, seed, acc in (("opd", 0, 0.5), ("opd", 1, 0.6), ("x", 0, 0.55), ("x", 1, 0.62), ("x", 2, 0.9))
    ]
    table = format_paired(runs)
    assert "| s | o | x | 2 | +0.035 [" in table  # seed 2 has no OPD run to pair with


def test_study_quick(tmp_path, capsys):
    pytest.importorskip("trl")  # the study's TRL baseline; absent only in test-oldest's floors run
    from fire_opd.demo.provenance import git_commit
    from fire_opd.demo.study import main

    args = [
        "--settings",
        "single",
        "--seeds",
        "0",
        "--variants",
        "opd",
        "fire",
        "--quick",
        "--jobs",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    table = (tmp_path / "study.md").read_text()
    for row in (
        "| opd |",
        "| fire |",
        "| trl_distillation |",
        "initial_reverse_kl_per_token",
        "| held-out, objective `full_vocab` | greedy | avg@8 | pass@8 |",
        "teacher_accuracy_from_student_prefixes",
        "### Against OPD, paired by seed (mean difference [95 % interval])",
        "| single | full_vocab | fire | 1 | ",
        "### What each rule keeps (mean over steps, then seeds)",
        f"| {git_commit()} |",
    ):
        assert row in table
    saved = json.loads((tmp_path / "study.json").read_text())
    fire = [r for r in saved["runs"] if r.get("variant") == "fire"]
    assert fire and "diag/dropped_correct" in fire[0]["diagnostics"]
    assert set(fire[0]["sampled"]) >= {"avg@8", "pass@8"} and fire[0]["commit"] == git_commit()
    assert (tmp_path / "study.png").stat().st_size > 10_000
    assert "4 ran now, 0 from the cache" in capsys.readouterr().out

    # the same jobs again: read back, printed as cached with the commit they ran on; --fresh reruns them
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 ran now, 4 from the cache" in out and f"(cached, ran on commit {git_commit()} at " in out
    # a cached run whose key no longer matches (another config, assets or code) is stale: rerun, never reported
    run = next((tmp_path / "runs").glob("train-single-full_vocab-opd-*.json"))
    run.write_text(json.dumps({**json.loads(run.read_text()), "cache_key": "from-other-code"}))
    assert main([*args, "--aggregate-only"]) == 0
    assert "1 cached runs under this folder were made by other code" in (tmp_path / "study.md").read_text()
    assert main([*args, "--variants", "opd", "--no-trl", "--fresh"]) == 0
    assert "2 ran now, 0 from the cache" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_shipped_teachers_solve_their_tasks(name):
    from fire_opd.demo.build_assets import ASSETS_DIR
    from fire_opd.train.evaluate import accuracy

    setting = SETTINGS[name]
    tokenizer = load_tokenizer(ASSETS_DIR / setting.tokenizer)
    for task, folder in setting.teachers.items():
        teacher = load_causal_lm(ASSETS_DIR / folder)
        problems = sample_problems([task], 64, seed=9, split="test")
        assert accuracy(teacher, tokenizer, problems, max_new_tokens=setting.recipe.sampling.max_new_tokens) >= 0.9


def test_asset_builder_quick(tmp_path):
    report = build(tmp_path, quick=True)
    assert set(report) == {"teacher_arith", "teacher_reverse", "student_init"}
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    model = load_causal_lm(tmp_path / "student_init")
    assert model.config.vocab_size == len(tokenizer)
    report = build_chain(tmp_path / "chain", quick=True)
    assert set(report) == {"teacher", "student_init"} and report["student_init"]["trained_on"] == "teacher samples"
    assert (
        load_causal_lm(tmp_path / "chain" / "student_init").config.hidden_size
        < load_causal_lm(tmp_path / "chain" / "teacher").config.hidden_size
    )
    report = build_steps(tmp_path, quick=True)
    assert {"steps/teacher", "steps/student_init", "brittle/teacher", "brittle/student_init", "cascade/teacher"} <= set(
        report
    )
    assert report["brittle/teacher"]["base"] == report["cascade/teacher"]["base"] == "steps/teacher"


def test_tokenizers_are_saved_under_a_class_every_supported_transformers_loads(tmp_path):
    """transformers 5 saves a fast tokenizer as "TokenizersBackend", a class 4.x (>= 4.56 is
    supported) does not know: the builder and the shipped assets name PreTrainedTokenizerFast,
    which both load as the same tokenizer."""
    from fire_opd.demo import ASSETS
    from fire_opd.demo.tasks import TASK_ALPHABET
    from fire_opd.demo.tiny_models import build_char_tokenizer

    built = build_char_tokenizer(TASK_ALPHABET, tmp_path)
    shipped = sorted(ASSETS.rglob("tokenizer_config.json"))
    assert len(shipped) >= 2
    for config in [tmp_path / "tokenizer_config.json", *shipped]:
        assert json.loads(config.read_text())["tokenizer_class"] == "PreTrainedTokenizerFast", config
    loaded = load_tokenizer(tmp_path)
    assert loaded("12+3=")["input_ids"] == built("12+3=")["input_ids"] and len(loaded) == len(built)


def test_tasks_and_verifier():
    for task in TASKS:
        for p in sample_problems([task], 20, seed=0, split="train"):
            assert is_correct(p.solution, p.answer)
    assert not set(p.prompt for p in sample_problems(["arith"], 200, seed=0, split="test")) & set(
        p.prompt for p in sample_problems(["arith"], 2000, seed=0, split="train")
    )
    assert is_correct(" 11-4=7 ", "7") and not is_correct("11-4=6", "7") and is_correct("31284", "31284")
    splits = [split_of(p) for p in sample_problems(["chain"], 50, seed=0, split="validation")]
    assert set(splits) == {"validation"}
    with pytest.raises(ValueError, match="split must be one of"):
        sample_problems(["arith"], 3, seed=0, split="dev")


def test_steps_solutions_write_additions_either_way_round():
    import random

    from fire_opd.demo.tasks import chain_steps, chain_terms

    terms = chain_terms("3+8-4+2-5+7=")
    assert chain_steps(terms) == "3+8=11,11-4=7,7+2=9,9-5=4,4+7=11"
    drawn = {chain_steps(terms, random.Random(seed)) for seed in range(20)}
    assert len(drawn) > 4 and all(is_correct(d, "11") and is_well_formed(d, "chain") for d in drawn)
    assert all(",11-4=7," in d for d in drawn)  # subtractions keep their order


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


def test_cli_lists_every_demo_setting_default_first():
    from fire_opd.cli.main import DEMO_SETTINGS
    from fire_opd.demo.recipes import DEFAULT_SETTING, STUDY_ONLY_SETTINGS

    assert DEMO_SETTINGS == tuple(s for s in SETTINGS if s not in STUDY_ONLY_SETTINGS)
    assert DEMO_SETTINGS[0] == DEFAULT_SETTING


def test_demo_variants_are_the_studys_and_bad_names_fail_before_loading(tmp_path, capsys):
    """The demo trains the study's variants by name (each its config overrides); a name that is
    not one is refused in one line, before any model loads."""
    from fire_opd.cli.main import main
    from fire_opd.demo.study.grid import VARIANTS

    assert DEMO_VARIANTS[:2] == ("opd", "fire") and set(DEMO_VARIANTS) <= set(VARIANTS)
    assert main(["demo", "--variants", "opd", "fire_trunc", "--out", str(tmp_path)]) == 2
    assert "--variants: ['fire_trunc'] are not variants" in capsys.readouterr().err
    with pytest.raises(ValueError, match="variants must be names from"):
        run_demo(variants=("opd", "drop"), out_dir=tmp_path, assets=tmp_path / "no-assets")
    summary = run_demo(
        "single",
        steps=1,
        eval_size=4,
        out_dir=tmp_path,
        progress=False,
        plot=False,
        samples=2,
        variants=("fire_truncate",),
    )
    (row,) = [r for r in summary["rows"] if r.get("variant")]
    assert row["model"] == "student + FiRe-OPD, truncate"
    curves = json.loads((tmp_path / "summary.json").read_text())["curves"]
    assert "fire/truncated_ratio" in curves["fire_truncate"][0]  # only the truncate rule logs it


def test_a_preset_variant_is_not_overridden_by_the_grids_objective():
    """FiRe as released in the study is the preset: the sampled objective, statistics per micro-batch
    of one, one rollout per prompt (the study's job sets full_vocab for every other variant)."""
    from fire_opd.demo.study.grid import job_config

    job = {"kind": "train", "setting": "steps", "seed": 0, "split": "test", "quick": False, "objective": "full_vocab"}
    released = job_config({**job, "variant": "fire_released"}, quick=False)
    opd = job_config({**job, "variant": "opd"}, quick=False)
    assert (released.loss.objective, released.loss.stats_scope, released.fire.method) == (
        "sampled",
        "micro_batch",
        "fire",
    )
    assert (released.sampling.samples_per_prompt, released.optim.micro_batch_size) == (1, 1)
    assert released.sampling.rollouts_per_step == opd.sampling.rollouts_per_step
    assert released.optim.lr == opd.optim.lr and opd.loss.objective == "full_vocab"
