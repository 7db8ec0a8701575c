"""Which solution format a model picks on a chain setting, and how often it is right in each.

    python benchmarks/chain_formats.py [--setting chain|steps|brittle-teacher] [--split validation|test]
                                       [--seed 0] [--json OUT] [CHECKPOINT ...]

Greedy completions (the recipe's token limit) of 400 problems of the split (the study's problems of
that seed) by the teacher, the initial student and each checkpoint given (e.g.
`/tmp/fire-opd-study/<run>/final`, written by the study),
classified as "rewrite" (no comma), "steps" (one binary operation per step) or "group" (sums of
positive and negative terms first). Prints, per model, {format: (count, accuracy)} and accuracy.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fire_opd.demo.build_assets import ASSETS_DIR  # noqa: E402
from fire_opd.demo.run import load_setting, problem_sets  # noqa: E402
from fire_opd.demo.tasks import is_correct  # noqa: E402
from fire_opd.train.models import load_causal_lm  # noqa: E402
from fire_opd.train.rollouts import generate_rollouts  # noqa: E402


def layout(text: str) -> str:
    if "," not in text:
        return "rewrite"
    return "steps" if text.count("=") >= 4 else "group"


def format_mix(model, tokenizer, problems, max_new_tokens: int) -> tuple[dict, float]:
    rollouts = generate_rollouts(
        model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens, do_sample=False
    )
    count, correct = collections.Counter(), collections.Counter()
    for text, problem in zip(rollouts.texts, problems):
        count[layout(text)] += 1
        correct[layout(text)] += is_correct(text, problem.answer)
    mix = {name: (count[name], round(correct[name] / count[name], 3)) for name in sorted(count)}
    return mix, sum(correct.values()) / len(problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--setting", default="chain", choices=["chain", "steps", "brittle-teacher"])
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write {model: {format: [count, accuracy]}, ...} here")
    args = parser.parse_args()
    setting, tokenizer, teachers = load_setting(args.setting)
    _, problems = problem_sets(setting, args.seed, 400, eval_split=args.split)
    models = {"teacher": teachers["chain"], "initial student": load_causal_lm(ASSETS_DIR / setting.student)}
    models.update({path: load_causal_lm(path) for path in args.checkpoints})
    report = {}
    for name, model in models.items():
        mix, accuracy = format_mix(model, tokenizer, problems, setting.recipe.sampling.max_new_tokens)
        report[name] = {"formats": mix, "accuracy": accuracy}
        print(f"{name}: {mix} accuracy {accuracy:.3f}")
    if args.json:
        args.json.write_text(
            json.dumps({"setting": args.setting, "split": args.split, "seed": args.seed, "models": report}, indent=1)
            + "\n"
        )


if __name__ == "__main__":
    main()
