"""`fire-opd` command line: train, eval, demo.

    fire-opd train --student PATH --teacher PATH --prompts train.jsonl [--config cfg.yaml] [--set key=value ...]
    fire-opd train --student PATH --teacher math=PATH --teacher code=PATH --prompts train.jsonl
    fire-opd eval  --model PATH --prompts held_out.jsonl
    fire-opd demo  [--setting chain|single|multi-teacher] [--objective sampled|full_vocab] [--steps N] [--seed S]
    fire-opd study [--settings ...] [--seeds ...] [--select] [--jobs 2]   (see fire_opd/study.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .config import TrainConfig


def _teachers(values: list[str]) -> dict[str, str]:
    teachers = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep:  # a bare path: the single, default teacher
            name, path = "default", item
        if name in teachers:
            raise SystemExit(f"--teacher {name!r} given twice")
        teachers[name] = path
    return teachers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fire-opd", description="FiRe-OPD on-policy distillation")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="distill a student from one or more teachers")
    train.add_argument("--config", help="YAML file with TrainConfig fields")
    train.add_argument("--student", help="student model path (Hugging Face format)")
    train.add_argument("--teacher", action="append", default=[], metavar="[NAME=]PATH",
                       help="teacher path; repeat as NAME=PATH for several teachers routed by the prompts' "
                            "'teacher' key")
    train.add_argument("--prompts", help="JSONL training prompts")
    train.add_argument("--eval-prompts", help="JSONL held-out prompts")
    train.add_argument("--output-dir")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any TrainConfig field, e.g. --set method=opd --set lr=1e-5")

    ev = sub.add_parser("eval", help="greedy pass@1 accuracy of a model on a prompt file")
    ev.add_argument("--model", required=True)
    ev.add_argument("--prompts", required=True)
    ev.add_argument("--tokenizer")
    ev.add_argument("--max-new-tokens", type=int, default=32)

    demo = sub.add_parser("demo", help="OPD vs FiRe-OPD on the built-in tasks and tiny models")
    demo.add_argument("--setting", choices=["chain", "single", "multi-teacher"], default="chain")
    demo.add_argument("--objective", choices=["sampled", "full_vocab"],
                      help="training signal (default: the setting's recipe)")
    demo.add_argument("--steps", type=int, help="training steps per method (default: the demo recipe)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-size", type=int, help="held-out problems (default 400)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--no-plot", action="store_true")
    sub.add_parser("study", help="every method x objective x seed on the demo settings (fire-opd study --help)",
                   add_help=False)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "study":  # its own parser: python -m fire_opd study --help
        from .study import main as study_main

        return study_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .trainer import FireOPDTrainer

        data = {}
        if args.config:
            import yaml
            from pathlib import Path

            data = yaml.safe_load(Path(args.config).read_text()) or {}
        for key, value in (("student", args.student), ("prompts", args.prompts),
                           ("eval_prompts", args.eval_prompts), ("output_dir", args.output_dir)):
            if value is not None:
                data[key] = value
        if args.teacher:
            data["teachers"] = _teachers(args.teacher)
        config = TrainConfig.from_dict(data, args.set)
        for key in ("student", "prompts"):
            if not getattr(config, key):
                raise SystemExit(f"fire-opd train: --{key} (or '{key}' in --config) is required")
        history = FireOPDTrainer(config).train()
        print(json.dumps(history[-1] if history else {}, indent=1))
    elif args.command == "eval":
        from .data import load_prompts
        from .evaluate import accuracy_by_teacher
        from .models import load_causal_lm, load_tokenizer

        model = load_causal_lm(args.model)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        scores = accuracy_by_teacher(model, tokenizer, load_prompts(args.prompts), max_new_tokens=args.max_new_tokens)
        print(json.dumps(scores, indent=1))
    else:
        from .demo import run_demo

        run_demo(args.setting, steps=args.steps, seed=args.seed, out_dir=args.out, eval_size=args.eval_size,
                 objective=args.objective, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
