"""`fire-opd train` / `fire-opd eval` as a user meets them: one-line errors (exit 2, no traceback)
for every mistake, checked before any model is loaded; sampled evaluation; chat prompts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fire_opd.cli import main as cli
from fire_opd.demo import tiny_models
from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
from fire_opd.train import models
from fire_opd.train.data import write_prompts

ASSETS = Path(__file__).resolve().parents[1] / "fire_opd" / "demo" / "assets"
STUDENT, TEACHER, TOKENIZER = ASSETS / "student_init", ASSETS / "teacher_arith", ASSETS / "tokenizer"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with a good prompt file; model loading is forbidden (errors come before it)."""
    monkeypatch.chdir(tmp_path)
    write_prompts(sample_problems(["arith"], 8, seed=0, split="train"), tmp_path / "p.jsonl")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_causal_lm", no_loading)
    return tmp_path


def _train(*extra: str) -> list[str]:
    return [
        "train",
        "--student",
        str(STUDENT),
        "--teacher",
        f"arith={TEACHER}",
        "--tokenizer",
        str(TOKENIZER),
        "--prompts",
        "p.jsonl",
        "--output-dir",
        "run",
        *extra,
    ]


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2 with exactly one stderr line and no traceback; return the line."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("fire-opd: error: "), err[0]
    return err[0]


def _copy_model(src: Path, dst: Path, *, tokenizer: Path | None = None) -> Path:
    shutil.copytree(src, dst)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, dst / f.name)
    return dst


def test_the_errors_a_new_user_meets(workdir, capsys):
    """The five cases of the issue, each one line naming what is wrong."""
    line = _error(
        capsys, ["train", "--student", "/path/that/does/not/exist", "--teacher", str(TEACHER), "--prompts", "p.jsonl"]
    )
    assert "student /path/that/does/not/exist: no such directory" in line
    line = _error(capsys, ["eval", "--model", str(TEACHER), "--prompts", "p.jsonl"])
    assert "no tokenizer files" in line and "--tokenizer" in line
    (workdir / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=" "answer": "4"}\n')
    assert "bad.jsonl:2: not valid JSON" in _error(capsys, _train()[:-4] + ["--prompts", "bad.jsonl"])
    assert "unknown config field 'no_such_field'" in _error(capsys, _train("--set", "no_such_field=1"))
    assert "prompts missing.jsonl: no such file" in _error(capsys, _train()[:-4] + ["--prompts", "missing.jsonl"])


def test_config_file_errors(workdir, capsys):
    cfg = workdir / "cfg.yaml"
    cases = {
        "optim:\n  lr: 1e-4\nfire:\n  percentil: 20\n": "cfg.yaml: unknown config field 'fire.percentil' (did you "
        "mean 'fire.percentile'?)",
        "lr: 1e-4\npercentil: 20\n": "cfg.yaml: unknown config field 'percentil' (did you mean 'percentile'?)",
        "optim: {lr: [1, 2\n": "cfg.yaml:2: not valid YAML",
        "- lr\n": "cfg.yaml: expected a mapping of config fields, got list",
        "optim:\n  lr: fast\n": "config field 'optim.lr' expects float, got 'fast'",
        "lr: fast\n": "config field 'optim.lr' expects float, got 'fast'",  # a flat key of earlier versions
        "fire:\n  method: firee\n": "fire.method must be one of",
        "eval:\n  samples: 4\n": "eval.samples=4 needs eval.temperature > 0",
        "data:\n  verifier: no_such_module:f\n": "cannot import module 'no_such_module'",
        "data:\n  verifier: fire_opd.train.verifiers:nope\n": "has no function 'nope'",
        "data:\n  chat_template_kwargs: [1]\n": "data.chat_template_kwargs must be a mapping",
    }
    for text, expected in cases.items():
        cfg.write_text(text)
        assert expected in _error(capsys, _train("--config", str(cfg))), text
    assert "--config nope.yaml: no such file" in _error(capsys, _train("--config", "nope.yaml"))
    assert "--set lr: override 'lr' must look like key=value" in _error(capsys, _train("--set", "lr"))


def test_model_tokenizer_and_prompt_errors(workdir, capsys):
    # a folder without a tokenizer, with no --tokenizer
    line = _error(capsys, ["train", "--student", str(STUDENT), "--teacher", str(TEACHER), "--prompts", "p.jsonl"])
    assert f"student {STUDENT}: no tokenizer files" in line
    # a folder without weights, a file instead of a folder
    (workdir / "empty").mkdir()
    (workdir / "empty" / "config.json").write_text((STUDENT / "config.json").read_text())
    assert "empty: no weights" in _error(capsys, _train("--set", "student=empty"))
    assert "is a file" in _error(capsys, _train("--set", f"student={STUDENT / 'config.json'}"))
    # prompts naming a teacher that is not loaded (the teacher is called "default")
    line = _error(
        capsys,
        [
            "train",
            "--student",
            str(STUDENT),
            "--teacher",
            str(TEACHER),
            "--tokenizer",
            str(TOKENIZER),
            "--prompts",
            "p.jsonl",
        ],
    )
    assert "names teacher 'arith', which is not among the loaded teachers ['default']" in line
    # a teacher with another vocabulary size
    line = _error(capsys, _train()[:4] + [f"arith={ASSETS / 'chain' / 'teacher'}"] + _train()[5:])
    assert "has vocab_size 17 but the student's tokenizer has 18 tokens" in line
    # a teacher with a tokenizer of the same size but different token ids
    other = tiny_models.build_char_tokenizer(TASK_ALPHABET.replace("R", "X"), workdir / "other_tok")
    assert len(other) == 18
    _copy_model(TEACHER, workdir / "teacher_other", tokenizer=workdir / "other_tok")
    line = _error(capsys, _train()[:4] + [f"arith={workdir / 'teacher_other'}"] + _train()[5:])
    assert "uses a different tokenizer from the student's: 2 of 18 tokens differ" in line
    # chat rows with a tokenizer that has no chat template
    (workdir / "chat.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "1+2="}], "answer": "3", "teacher": "arith"}) + "\n"
    )
    no_template = workdir / "no_template"
    shutil.copytree(TOKENIZER, no_template)
    (no_template / "chat_template.jinja").unlink()
    line = _error(capsys, _train("--prompts", "chat.jsonl", "--tokenizer", str(no_template)))
    assert "'messages' rows but the tokenizer has no chat template" in line
    (workdir / "chat_bad.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "1+2="}], "answer": "3"}\n'
        '{"messages": [{"role": "user", "content": null}], "answer": "3"}\n'
    )
    assert "chat_bad.jsonl:2: 'messages' must be a non-empty list" in _error(
        capsys, _train("--prompts", "chat_bad.jsonl")
    )
    # teacher flags
    assert "--teacher 'x=': expected PATH or NAME=PATH" in _error(capsys, _train("--teacher", "x="))
    assert "given twice" in _error(capsys, _train("--teacher", f"arith={TEACHER}"))


def test_eval_option_errors(workdir, capsys):
    base = ["eval", "--model", str(TEACHER), "--tokenizer", str(TOKENIZER), "--prompts", "p.jsonl"]
    assert "--samples 4 needs --temperature > 0" in _error(capsys, base + ["--samples", "4"])
    assert "--chat-template-kwargs '{x': not valid JSON" in _error(capsys, base + ["--chat-template-kwargs", "{x"])
    assert "--verifier: verifier 'nope'" in _error(capsys, base + ["--verifier", "nope"])
    assert "--output out/x.json: its folder does not exist" in _error(capsys, base + ["--output", "out/x.json"])
    assert "invalid int value" in _error(capsys, base + ["--samples", "many"])  # argparse, same format
    assert "--dtype: invalid choice: 'fp8'" in _error(capsys, base + ["--dtype", "fp8"])


def test_debug_shows_the_traceback(workdir):
    from fire_opd.errors import UsageError

    with pytest.raises(UsageError, match="no such directory"):
        cli.main(["train", "--debug", "--student", "/nope", "--teacher", str(TEACHER), "--prompts", "p.jsonl"])


def test_a_new_run_does_not_overwrite_an_old_one(workdir, capsys):
    (workdir / "run").mkdir()
    (workdir / "run" / "metrics.jsonl").write_text('{"train/step": 1}\n')
    line = _error(capsys, _train())
    assert "output_dir run already holds a run" in line and "--overwrite" in line
    assert "resume_from nope: no such checkpoint folder" in _error(capsys, _train("--set", "resume_from=nope"))


def test_the_installed_entry_point_prints_one_line(tmp_path):
    """The real process: exit status 2, one line on stderr, no traceback."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fire_opd",
            "train",
            "--student",
            "/path/that/does/not/exist",
            "--teacher",
            str(TEACHER),
            "--prompts",
            "p.jsonl",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "fire-opd: error: student /path/that/does/not/exist: no such directory; expected a Hugging Face "
        "model folder (config.json + weights) or a Hub id like 'Qwen/Qwen3-0.6B'"
    ]


def test_eval_prints_avg_and_pass_at_k(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = sample_problems(["arith", "reverse"], 6, seed=0, split="test")
    write_prompts(problems, tmp_path / "p.jsonl")
    argv = [
        "eval",
        "--model",
        str(ASSETS / "teacher_arith"),
        "--tokenizer",
        str(TOKENIZER),
        "--prompts",
        "p.jsonl",
        "--samples",
        "4",
        "--temperature",
        "1.0",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "5",
        "--no-progress",
        "--output",
        "scores.json",
    ]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "scores.json").read_text())["results"]
    assert set(printed) == {"all", "arith", "reverse"}
    for summary in printed.values():
        assert set(summary) == {"avg@4", "pass@1", "pass@2", "pass@4", "problems"}
        assert summary["pass@1"] == pytest.approx(summary["avg@4"])
        assert summary["pass@1"] <= summary["pass@2"] <= summary["pass@4"]
    assert printed["all"]["problems"] == 6 and printed["arith"]["problems"] == 3
    assert printed["arith"]["avg@4"] > printed["reverse"]["avg@4"]  # the arithmetic teacher cannot reverse
    assert cli.main(argv) == 0  # the same seed samples the same completions
    assert json.loads(capsys.readouterr().out) == printed


def test_chat_rows_render_to_the_same_token_ids(tmp_path, capsys, monkeypatch):
    """A `messages` row evaluates exactly like the raw prompt its chat template renders to."""
    monkeypatch.chdir(tmp_path)
    problems = sample_problems(["arith"], 6, seed=0, split="test")
    write_prompts(problems, tmp_path / "raw.jsonl")
    with (tmp_path / "chat.jsonl").open("w") as f:
        for p in problems:
            f.write(json.dumps({"messages": [{"role": "user", "content": p.prompt}], "answer": p.answer}) + "\n")
    base = ["eval", "--model", str(TEACHER), "--tokenizer", str(TOKENIZER), "--max-new-tokens", "6", "--no-progress"]
    cli.main(base + ["--prompts", "raw.jsonl"])
    raw = json.loads(capsys.readouterr().out)
    cli.main(base + ["--prompts", "chat.jsonl", "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert json.loads(capsys.readouterr().out) == raw


def test_eval_output_keeps_every_completion_and_finds_a_runs_model(tmp_path, capsys, monkeypatch):
    """`--output` holds the settings and each problem's completions and scores; `--model RUN_DIR`
    evaluates the run's final checkpoint."""
    import shutil

    monkeypatch.chdir(tmp_path)
    write_prompts(sample_problems(["arith"], 4, seed=0, split="test"), tmp_path / "p.jsonl")
    run = tmp_path / "run"
    shutil.copytree(TEACHER, run / "final")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, run / "final" / name)
    (run / "config.json").write_text("{}")  # the run's TrainConfig, not a model's
    argv = ["eval", "--model", str(run), "--prompts", "p.jsonl", "--samples", "2", "--temperature", "1.0",
            "--output", "out.json", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"evaluating {run / 'final'}" in err
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["settings"]["samples"] == 2 and record["settings"]["model"] == str(run / "final")
    assert len(record["problems"]) == 4
    for row in record["problems"]:
        assert len(row["completions"]) == 2 and len(row["scores"]) == 2 and row["answer"]
    assert record["results"]["all"]["problems"] == 4


def test_a_run_reports_itself(tmp_path, capsys, monkeypatch):
    """A CLI run evaluates the initial student (a metrics row at step 0), ends with a summary
    (stdout and summary.json), the before -> after evaluation and its curves; `fire-opd plot`
    overlays runs."""
    monkeypatch.chdir(tmp_path)
    write_prompts(sample_problems(["arith"], 16, seed=0, split="train"), tmp_path / "p.jsonl")
    write_prompts(sample_problems(["arith"], 8, seed=1, split="test"), tmp_path / "held.jsonl")
    base = _train("--eval-prompts", "held.jsonl", "--set", "optim.steps=2", "--set", "sampling.prompts_per_step=4",
                  "--set", "sampling.max_new_tokens=6", "--set", "eval.every=1", "--set", "logging.progress=false",
                  "--set", "logging.report_to=none")  # fmt: skip
    assert cli.main(base) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train/step"] == 0 and "eval/accuracy" in rows[0] and "train/loss" not in rows[0]
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_model"] == str(tmp_path / "run" / "final") and summary["steps"] == 2
    assert summary["initial_eval"]["eval/accuracy"] == rows[0]["eval/accuracy"]
    assert summary["final_eval"]["eval/accuracy"] == rows[-1]["eval/accuracy"] and summary["tokens_per_s"] > 0
    err = captured.err.strip().splitlines()
    assert any(line.startswith("fire-opd: eval/accuracy ") and "(step 0) -> " in line for line in err)
    assert err[-1] == "fire-opd: finished 2 steps; final model run/final"
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert cli.main(["plot", "run", "run", "--out", "both.png"]) == 0 and (tmp_path / "both.png").is_file()
    assert cli.main(["plot", "nothing_here"]) == 2
    assert "nothing_here: no metrics.jsonl" in capsys.readouterr().err


def test_eval_of_a_run_takes_the_runs_settings(tmp_path, capsys, monkeypatch):
    """`fire-opd eval --model RUN_DIR` scores as the run was trained: its verifier (here a custom
    one in the current directory, which the console script must import), token limit and
    columns; a flag overrides each; --output records which came from the run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as the console script
    (tmp_path / "my_checks.py").write_text("def always(completion, answer, row):\n    return 1.0\n")
    rows = [{"question": p.prompt, "gold": p.answer} for p in sample_problems(["arith"], 3, seed=0, split="test")]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    shutil.copytree(TEACHER, run / "final")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, run / "final" / name)
    config = {"data": {"verifier": "my_checks:always", "prompt_field": "question", "answer_field": "gold",
                       "messages_field": "messages", "chat_template_kwargs": {}},
              "sampling": {"max_new_tokens": 5}, "models": {"dtype": "bfloat16"}}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    loaded = []
    real_load = models.load_causal_lm

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(models, "load_causal_lm", load)
    argv = ["eval", "--model", str(run), "--prompts", "q.jsonl", "--output", "out.json", "--no-progress"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert (
        "as the run was trained: dtype 'bfloat16', verifier 'my_checks:always', max_new_tokens 5, "
        "prompt_field 'question'" in err
    )
    record = json.loads((tmp_path / "out.json").read_text())
    settings = record["settings"]
    assert settings["verifier"] == "my_checks:always" and settings["max_new_tokens"] == 5
    assert settings["dtype"] == "bfloat16" and loaded == [torch.bfloat16]  # the student as it was trained
    assert settings["columns"] == {"prompt": "question", "answer": "gold", "messages": "messages"}
    assert "verifier" in settings["from_run"] and record["results"]["all"]["avg@1"] == 1.0  # the run's verifier
    assert cli.main([*argv, "--verifier", "final_answer", "--max-new-tokens", "3", "--dtype", "float32"]) == 0
    settings = json.loads((tmp_path / "out.json").read_text())["settings"]  # flags win
    assert settings["verifier"] == "final_answer" and settings["max_new_tokens"] == 3
    assert settings["dtype"] == "float32" and loaded[-1] == torch.float32
    checkpoint = json.loads((run / "final" / "config.json").read_text())  # --dtype auto: the checkpoint's own
    (run / "final" / "config.json").write_text(json.dumps({**checkpoint, "dtype": "float16", "torch_dtype": "float16"}))
    assert cli.main([*argv, "--dtype", "auto"]) == 0 and loaded[-1] == torch.float16
    assert "verifier" not in settings["from_run"] and "prompt_field" in settings["from_run"]


def test_wandb_without_a_login_fails_before_any_model_loads(workdir, capsys, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(workdir))  # no ~/.netrc
    line = _error(capsys, _train("--set", "logging.report_to=[wandb]"))
    assert "logging.report_to: wandb has no login here" in line and "WANDB_MODE=offline" in line
    (workdir / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789\n")
    from fire_opd.train.run_log import check_report_to

    check_report_to(["wandb"])  # `wandb login` wrote the netrc: fine
    (workdir / ".netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_report_to(["wandb"])  # offline needs no login


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_or_failed_load_leaves_no_lock(workdir, capsys, monkeypatch, raised):
    """Ctrl-C while the models load exits 130 with one line (no traceback); a load that fails
    raises; either way the output directory is not left locked."""
    import fire_opd.train.trainer as trainer_module

    def loading(*args, **kwargs):
        assert (workdir / "run" / ".fire-opd.lock").is_file()  # held while loading
        raise raised("while loading")

    monkeypatch.setattr(trainer_module, "prepare_models", loading)
    argv = _train("--set", "logging.report_to=none")
    if raised is KeyboardInterrupt:
        assert cli.main(argv) == cli.EXIT_ABORTED
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            "fire-opd: train interrupted while checking the inputs or loading the models; nothing was trained"
        ]
    else:
        with pytest.raises(RuntimeError, match="while loading"):
            cli.main(argv)
    assert not (workdir / "run" / ".fire-opd.lock").exists()


def test_fsdp_on_cpu_with_a_torch_that_sums_its_gradients_fails_before_any_model_loads(workdir, capsys, monkeypatch):
    """Before torch 2.9, FSDP2 over gloo sums the gradients it should average (2.7, 2.8) or fails
    at its first all-gather (2.6): under torchrun on CPU `parallel.student=fsdp` is one line
    before loading, not a run whose updates are K times too large. On CUDA (NCCL) it runs."""
    import torch
    from torch.torch_version import TorchVersion

    import fire_opd.train.trainer as trainer_module
    from fire_opd.cli.preflight import check_fsdp
    from fire_opd.errors import UsageError
    from fire_opd.train.config import TrainConfig

    def load_nothing(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer_module, "prepare_models", load_nothing)
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0+cu128"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = _error(capsys, _train("--set", "parallel.teachers=fsdp", "--set", "runtime.device=cpu"))
    assert line == (
        "fire-opd: error: parallel.teachers: fsdp on CPU needs torch >= 2.9, found 2.8.0+cu128: before it FSDP2 "
        "sums the gradients over gloo instead of averaging them (pytorch/pytorch#162338); use ddp on CPU"
    )

    def config(device: str, **parallel) -> TrainConfig:
        return TrainConfig.from_dict({"runtime": {"device": device}, "parallel": parallel})

    check_fsdp(config("cuda", student="fsdp"))  # NCCL averages
    check_fsdp(config("cpu", student="ddp"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="parallel.student and parallel.teachers: fsdp on CPU"):
        check_fsdp(config("auto", student="fsdp", teachers="fsdp"))
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.9.0+cpu"))
    check_fsdp(config("cpu", student="fsdp"))
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0+cu128"))
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing is sharded
    check_fsdp(config("cpu", student="fsdp"))


def test_the_triton_backend_where_its_compiler_aborts_fails_before_any_model_loads(workdir, capsys, monkeypatch):
    """Triton 3.2 aborts compiling the backward on sm_90 with 16-bit operands (the compile matrix):
    `runtime.backend=triton` there is one line before loading, not a dead process after it."""
    import torch

    from fire_kernels.backends import triton_token_stats
    from fire_opd.cli.preflight import check_kernel_backend
    from fire_opd.train.config import TrainConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton_token_stats.triton, "__version__", "3.2.0")
    line = _error(capsys, _train("--set", "runtime.backend=triton", "--set", "models.dtype=bfloat16"))
    assert "runtime.backend: triton cannot train here: Triton 3.2.0" in line and "sm_90 with bfloat16" in line
    assert "runtime.backend=auto" in line

    def config(**runtime):
        return TrainConfig.from_dict({"runtime": runtime, "models": {"dtype": "float32"}})

    check_kernel_backend(config(backend="triton"))  # float32 compiles there
    check_kernel_backend(config(backend="auto"))
    monkeypatch.setattr(triton_token_stats.triton, "__version__", "3.3.1")
    check_kernel_backend(TrainConfig.from_dict({"runtime": {"backend": "triton"}, "models": {"dtype": "bfloat16"}}))
