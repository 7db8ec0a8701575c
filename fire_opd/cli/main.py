"""`fire-opd` command line: train, eval, plot, demo, study.

A mistake in the command line, the YAML or the files they name is one line on stderr and exit
status 2 (fire_opd/cli/preflight.py checks it before any model is loaded); `--debug` shows the traceback.

    fire-opd train --student PATH --teacher PATH --prompts FILE|DIR|DATASET_ID [--config cfg.yaml] [--set key=value ...]
    fire-opd train --student PATH --teacher math=PATH --teacher code=PATH --prompts train.jsonl
    fire-opd eval  --model PATH|RUN_DIR --prompts FILE|DIR|DATASET_ID [--split S] [--samples N --temperature T
                   --top-p P --output F]
    fire-opd plot  RUN_DIR [RUN_DIR ...] [--out curves.png]
    fire-opd demo  [--setting steps|brittle-teacher|error-cascade|chain|single|multi-teacher]
                   [--objective sampled|full_vocab] [--steps N] [--seed S] [--samples K]
    fire-opd study [--settings ...] [--seeds ...] [--select] [--jobs 2]   (see fire_opd/demo/study/)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Literal, Optional

from fire_opd.cli.preflight import check_model, check_prompts, check_tokenizer, check_train, load_config
from fire_opd.errors import TrainingStopped, UsageError

# Exit statuses of `fire-opd train` beside 0 (finished), 1 (stopped by an error) and 2 (bad input):
EXIT_STOPPED = 75  # stopped at a step boundary by SIGTERM / Ctrl-C, with a checkpoint: resume it (EX_TEMPFAIL)
EXIT_ABORTED = 130  # stopped at once by a second signal, without a new checkpoint


class _Parser(argparse.ArgumentParser):
    """argparse with our error format (one line, exit 2) and no usage dump."""

    def error(self, message: str):
        self.exit(2, f"fire-opd: error: {message}\n")


def _teachers(values: list[str]) -> dict[str, str]:
    teachers = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep:  # a bare path: the single, default teacher
            name, path = "default", item
        if not name or not path:
            raise UsageError(f"--teacher {item!r}: expected PATH or NAME=PATH")
        if name in teachers:
            raise UsageError(f"--teacher {name!r} given twice")
        teachers[name] = path
    return teachers


# fire_opd.demo.recipes.SETTINGS' names, default first (spelled out so that `--help` imports no torch; a test
# keeps the two equal)
DEMO_SETTINGS = ("steps", "brittle-teacher", "error-cascade", "chain", "single", "multi-teacher")
EVAL_DTYPES = ("float32", "bfloat16", "float16", "auto")  # fire-opd eval --dtype: torch's names, or the checkpoint's


def _fields_epilog() -> str:
    """Every config field with its default and help (the dataclasses' `help` metadata)."""
    import textwrap

    from fire_opd.train.config import field_docs

    lines = ["config fields (YAML sections, or --set section.field=value):"]
    for key, default, text in field_docs():
        lines.append(f"  {key} = {default}")
        lines += textwrap.wrap(text, width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fire-opd", description="FiRe-OPD on-policy distillation")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an error")

    train = sub.add_parser(
        "train",
        parents=[debug],
        help="distill a student from one or more teachers",
        epilog=_fields_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML file with TrainConfig fields")
    train.add_argument("--student", help="student model path (Hugging Face format)")
    train.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="teacher path; repeat as NAME=PATH for several teachers routed by the prompts' 'teacher' key",
    )
    train.add_argument("--tokenizer", help="tokenizer path (default: the student's folder)")
    train.add_argument(
        "--prompts", help="training prompts: .jsonl/.json/.csv/.tsv/.parquet, a folder, or a Hugging Face dataset id"
    )
    train.add_argument("--eval-prompts", help="held-out prompts (the same kinds of source)")
    train.add_argument("--output-dir")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any TrainConfig field, e.g. --set fire.method=opd --set checkpoint.resume_from=latest",
    )

    ev = sub.add_parser("eval", parents=[debug], help="avg@N and pass@k of a model on a prompt file")
    ev.add_argument("--model", required=True)
    ev.add_argument("--prompts", required=True, help="a prompt file, folder or dataset id, as for train")
    ev.add_argument("--split", default="train", help="the split of a dataset id or folder (default: train)")
    # these six default to the run's own settings when --model is a training run (or one of its checkpoints)
    ev.add_argument("--prompt-field", help="the column with the prompt (default: the run's, else prompt)")
    ev.add_argument("--answer-field", help="the column with the answer (default: the run's, else answer)")
    ev.add_argument("--messages-field", help="the column with chat messages (default: the run's, else messages)")
    ev.add_argument("--tokenizer", help="tokenizer path (default: the model's folder)")
    ev.add_argument("--max-new-tokens", type=int, help="(default: the run's sampling.max_new_tokens, else 32)")
    ev.add_argument("--samples", type=int, default=1, help="completions per problem (N of avg@N, pass@k)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0: greedy (needs --samples 1)")
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument(
        "--verifier",
        help="final_answer | last_number | boxed | package.module:function (default: the run's, else final_answer)",
    )
    ev.add_argument(
        "--chat-template-kwargs",
        metavar="JSON",
        help='for "messages" rows, e.g. \'{"enable_thinking": false}\' (default: the run\'s, else {})',
    )
    ev.add_argument("--batch-size", type=int, default=64, help="completions per generate call")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="auto")
    ev.add_argument(
        "--dtype",
        choices=EVAL_DTYPES,
        help="the weights' dtype (default: the run's models.dtype, else float32); auto: the checkpoint's own, "
        "from its config.json. bfloat16 halves the memory: a 30B model fits one 80 GB GPU",
    )
    ev.add_argument("--output", help="also write the JSON to this file")
    ev.add_argument("--no-progress", action="store_true")

    demo = sub.add_parser("demo", help="OPD, FiRe-OPD and the recommended rule on the built-in tasks and tiny models")
    demo.add_argument("--setting", choices=DEMO_SETTINGS, default=DEMO_SETTINGS[0])
    demo.add_argument(
        "--objective", choices=["sampled", "full_vocab"], help="training signal (default: the setting's recipe)"
    )
    demo.add_argument("--steps", type=int, help="training steps per method (default: the demo recipe)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-size", type=int, help="held-out problems (default 400)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument(
        "--samples",
        type=int,
        default=8,
        help="sampled completions per held-out problem for avg@K and pass@K (default 8)",
    )
    demo.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        help="what to train side by side, by the study's variant names (fire-opd study --help lists them; "
        "default: OPD, FiRe-OPD and the recommended rule)",
    )
    demo.add_argument("--no-plot", action="store_true")
    plot_parser = sub.add_parser("plot", parents=[debug], help="overlay the curves of training runs")
    plot_parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output directories of training runs")
    plot_parser.add_argument("--out", default="curves.png", help="the figure (PNG)")
    sub.add_parser(
        "study", help="every method x objective x seed on the demo settings (fire-opd study --help)", add_help=False
    )
    return parser


def train(args: argparse.Namespace) -> int:
    config = load_config(
        args.config,
        {
            "models.student": args.student,
            "models.tokenizer": args.tokenizer,
            "data.prompts": args.prompts,
            "data.eval_prompts": args.eval_prompts,
            "output_dir": args.output_dir,
            "models.teachers": _teachers(args.teacher) if args.teacher else None,
            "checkpoint.overwrite": True if args.overwrite else None,
        },
        args.set,
    )
    check_train(config)
    from fire_opd.train.trainer import FireOPDTrainer

    trainer = FireOPDTrainer(config)
    try:
        trainer.train()
        return _finish(trainer, config)
    except KeyboardInterrupt as exc:  # a second Ctrl-C / SIGTERM (or one after the loop): stop at once
        from fire_opd.train.run_dir import latest_checkpoint

        if trainer.is_main:
            newest = latest_checkpoint(config.output_dir)
            print(
                f"fire-opd: aborted by {exc or 'an interrupt'} at step {trainer.step}; the newest complete "
                f"checkpoint is {newest or 'none'}" + (" (--set checkpoint.resume_from=latest)" if newest else ""),
                file=sys.stderr,
            )
        return EXIT_ABORTED


def _finish(trainer, config) -> int:
    """What a run that ended prints, and its exit status."""
    from fire_opd.parallel import distributed

    trainer.parallel.release()  # DDP's reducer first, then the process group: either left to interpreter
    distributed.teardown()  # exit can hang or abort it (gloo's threads)
    if not trainer.is_main:  # under torchrun rank 0 reports
        return EXIT_STOPPED if trainer.stopped_by_signal else 0
    summary = trainer.summary()
    print(json.dumps(summary, indent=1))  # also in output_dir/summary.json
    _report(summary, config.output_dir)
    if trainer.stopped_by_signal:
        print(
            f"fire-opd: stopped by {trainer.stopped_by_signal} after step {trainer.step} of "
            f"{config.optim.steps} with checkpoint {Path(config.output_dir) / f'step-{trainer.step:06d}'}; resume "
            "with --set checkpoint.resume_from=latest",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    print(
        f"fire-opd: finished {trainer.step} steps; final model {Path(config.output_dir) / 'final'}",
        file=sys.stderr,
    )
    return 0


def _report(summary: dict, output_dir: str) -> None:
    """The run's result in a few lines on stderr, and its curves (output_dir/curves.png)."""
    initial, final = summary["initial_eval"], summary["final_eval"]
    for key in [k for k in final if k in initial] or list(final):
        before = f"{initial[key]:.3f} (step 0) -> " if key in initial else ""
        print(f"fire-opd: {key} {before}{final[key]:.3f} (step {summary['final_eval_step']})", file=sys.stderr)
    if summary["tokens_per_s"]:
        print(f"fire-opd: {summary['seconds']:.0f} s, {summary['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    try:
        from fire_opd.train.plots import plot_runs

        plot_runs([output_dir], Path(output_dir) / "curves.png")
    except ImportError:
        print("fire-opd: no curves.png (matplotlib is not installed: pip install matplotlib)", file=sys.stderr)


def plot(args: argparse.Namespace) -> int:
    from fire_opd.train.plots import plot_runs

    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise UsageError(f"{run}: no metrics.jsonl; expected the output_dir of a fire-opd training run")
    if not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out {args.out}: its folder does not exist")
    print(plot_runs(args.runs, args.out))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from fire_opd.train.evaluate import sample_scores, summarize_by_teacher
    from fire_opd.train.verifiers import resolve_verifier

    model_path = _model_of_run(args.model)
    from_run = _settings_of_run(args, model_path)
    try:
        kwargs = json.loads(args.chat_template_kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--chat-template-kwargs {args.chat_template_kwargs!r}: not valid JSON ({exc.msg})") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--chat-template-kwargs must be a JSON object, got {args.chat_template_kwargs!r}")
    if args.samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--samples, --batch-size and --max-new-tokens must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}")
    if args.samples > 1 and args.temperature == 0:
        raise UsageError(f"--samples {args.samples} needs --temperature > 0 (greedy decoding repeats one completion)")
    try:
        verifier = resolve_verifier(args.verifier)
    except ValueError as exc:
        raise UsageError(f"--verifier: {exc}") from None
    check_model(model_path, "--model")
    tokenizer = check_tokenizer(
        args.tokenizer or model_path, "--tokenizer" if args.tokenizer else "--model", "pass --tokenizer PATH"
    )
    from fire_opd.train.data import PromptColumns

    try:
        columns = PromptColumns(prompt=args.prompt_field, answer=args.answer_field, messages=args.messages_field)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    problems = check_prompts(
        args.prompts, "--prompts", tokenizer, kwargs, columns=columns, split=args.split, split_field="--split"
    )
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise UsageError(f"--output {args.output}: its folder does not exist")

    import torch

    from fire_opd.train.models import load_causal_lm
    from fire_opd.train.trainer import resolve_device

    dtype: torch.dtype | Literal["auto"] = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_causal_lm(model_path, dtype=dtype, device=resolve_device(args.device))
    completions: list[str] = []
    scores = sample_scores(
        model,
        tokenizer,
        problems,
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        verifier=verifier,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
        completions=completions,
    )
    results = summarize_by_teacher(problems, scores)
    print(json.dumps(results, indent=1))
    if args.output:  # everything needed to read the numbers again: settings, and each problem's samples
        settings = {
            "model": str(model_path), "prompts": args.prompts, "split": args.split, "samples": args.samples,
            "columns": {"prompt": args.prompt_field, "answer": args.answer_field, "messages": args.messages_field},
            "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "verifier": args.verifier, "seed": args.seed, "chat_template_kwargs": kwargs, "dtype": args.dtype,
            "from_run": sorted(from_run),  # the settings taken from the training run's config
        }  # fmt: skip
        per_problem = [
            {"prompt": p.prompt, "answer": p.answer, "teacher": p.teacher,
             "completions": completions[i * args.samples : (i + 1) * args.samples], "scores": scores[i].tolist()}
            for i, p in enumerate(problems)
        ]  # fmt: skip
        record = {"settings": settings, "results": results, "problems": per_problem}
        Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    return 0


# `fire-opd eval` flag -> (where a run's config keeps it, the default without a run)
RUN_SETTINGS = {
    "dtype": ("models.dtype", "float32"),
    "verifier": ("data.verifier", "final_answer"),
    "max_new_tokens": ("sampling.max_new_tokens", 32),
    "prompt_field": ("data.prompt_field", "prompt"),
    "answer_field": ("data.answer_field", "answer"),
    "messages_field": ("data.messages_field", "messages"),
    "chat_template_kwargs": ("data.chat_template_kwargs", "{}"),
}


def _settings_of_run(args: argparse.Namespace, model_path: str) -> dict:
    """Fill the eval flags the user left out from the training run's config (a run's output
    directory or one of its checkpoints was given), else from the defaults; return the settings
    taken from the run (said on stderr)."""
    config = _config_of_run(Path(args.model), Path(model_path))
    taken = {}
    for name, (key, default) in RUN_SETTINGS.items():
        if getattr(args, name) is not None:
            continue
        section, _, field = key.partition(".")
        value = (config or {}).get(section, {}).get(field)
        if value is None:
            setattr(args, name, default)
        else:
            taken[name] = value
            setattr(args, name, json.dumps(value) if name == "chat_template_kwargs" else value)
    if taken:
        listed = ", ".join(f"{name} {value!r}" for name, value in taken.items())
        print(f"fire-opd: as the run was trained: {listed} (a flag overrides each)", file=sys.stderr)
    return taken


def _config_of_run(given: Path, model: Path) -> Optional[dict]:
    """The TrainConfig (as a dict) a run or checkpoint was trained with, or None for a plain model."""
    for path in (model / "trainer_state.json", given / "trainer_state.json"):
        if path.is_file():
            config = json.loads(path.read_text()).get("config")
            if isinstance(config, dict):
                return config
    run_config = given / "config.json"  # a run's output directory: its TrainConfig (a model's is its HF config)
    if run_config.is_file():
        config = json.loads(run_config.read_text())
        if isinstance(config, dict) and isinstance(config.get("data"), dict):
            return config
    return None


def _model_of_run(path: str) -> str:
    """A model folder as given, or, for a training run's output directory, its final checkpoint
    (else its newest one), said on stderr."""
    from fire_opd.train.run_dir import latest_checkpoint

    folder = Path(path)
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    if not folder.is_dir() or weights:
        return path
    newest = folder / "final" if (folder / "final").is_dir() else latest_checkpoint(folder)
    if newest is None:
        return path
    print(f"fire-opd: --model {path} is a training run: evaluating {newest}", file=sys.stderr)
    return str(newest)


def _quiet_third_party() -> None:
    """Model loading and shard writing keep their progress bars out of the run's output (the
    trainer has its own). transformers reads the variable when it is imported; importing it here
    would cost every command a second before its first check."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class _OnePrefix(logging.Formatter):
    """fire-opd's log lines under the prefix of every other line it prints ("fire-opd: "); other
    libraries' under their logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        who = "fire-opd" if record.name.split(".")[0] == "fire_opd" else record.name
        return f"{who}: {record.getMessage()}"


def _log_with_one_prefix() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_OnePrefix())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "study":  # its own parser: python -m fire_opd study --help
        from fire_opd.demo.study import main as study_main

        return study_main(argv[1:])
    args = build_parser().parse_args(argv)
    _quiet_third_party()
    if args.command == "demo":
        from fire_opd.demo.recipes import DEMO_VARIANTS
        from fire_opd.demo.run import run_demo
        from fire_opd.demo.study.grid import VARIANTS

        unknown = [v for v in args.variants or () if v not in VARIANTS]
        if unknown:
            print(
                f"fire-opd: error: --variants: {unknown} are not variants; expected names from {list(VARIANTS)}",
                file=sys.stderr,
            )
            return 2

        run_demo(
            args.setting,
            steps=args.steps,
            seed=args.seed,
            out_dir=args.out,
            eval_size=args.eval_size,
            objective=args.objective,
            variants=tuple(args.variants or DEMO_VARIANTS),
            plot=not args.no_plot,
            samples=args.samples,
        )
        return 0
    _log_with_one_prefix()
    try:
        return {"train": train, "eval": evaluate, "plot": plot}[args.command](args)
    except (UsageError, TrainingStopped) as exc:
        if args.debug:
            raise
        print(f"fire-opd: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:  # Ctrl-C before training began (a run in training says more, in `train`)
        if args.debug:
            raise
        what = "while checking the inputs or loading the models; nothing was trained" if args.command == "train" else ""
        print(f"fire-opd: {args.command} interrupted {what}".rstrip(), file=sys.stderr)
        return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())
