"""How much code one default training step runs: the distinct files and functions (closures
counted; generator expressions and lambdas not) of fire_opd and fire_kernels that
`FireOPDTrainer.train_step` enters, as a cold reader following the step would have to read them.

    python benchmarks/trace_step.py            # one step of the default recipe, one process

The step is the default recipe's (dense objective, FiRe-OPD, chunked kernels) on tiny models; the
trainer is set up first and only the step is traced (`sys.setprofile`). Run it on two commits to
compare them (issue 29 did: 793dc85 against its final commit).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fire_opd", "fire_kernels")


def traced_step() -> dict[str, set[str]]:
    """{file: {function}} of the package code one `train_step` enters."""
    from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
    from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
    from fire_opd.train.config import TrainConfig, dotted
    from fire_opd.train.trainer import FireOPDTrainer

    tokenizer = build_char_tokenizer(TASK_ALPHABET)

    def model(seed: int, hidden: int):
        return tiny_llama(
            len(tokenizer), hidden, 1, 2, seed=seed, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id
        )

    with tempfile.TemporaryDirectory() as out:
        settings = dict(output_dir=out, steps=1, prompts_per_step=4, samples_per_prompt=2, micro_batch_size=4)
        config = TrainConfig.from_dict(
            {"logging.report_to": [], "logging.progress": False, "eval.at_start": False, **dotted(settings)}
        )
        trainer = FireOPDTrainer(
            config,
            student=model(0, 32),
            teachers={"arith": model(1, 48)},
            tokenizer=tokenizer,
            train_problems=sample_problems(("arith",), 40, seed=1, split="train"),
            eval_problems=[],
        )
        seen: dict[str, set[str]] = collections.defaultdict(set)

        def profile(frame, event, _arg):
            if event != "call":
                return
            path = Path(frame.f_code.co_filename)
            try:
                relative = path.resolve().relative_to(ROOT)
            except ValueError:
                return
            name = frame.f_code.co_qualname
            if relative.parts[0] in PACKAGES and not name.endswith(">"):  # not <genexpr>, <lambda>, ...
                seen[str(relative)].add(name)

        sys.setprofile(profile)
        try:
            trainer.train_step()
        finally:
            sys.setprofile(None)
        trainer.close()
    return seen


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    seen = traced_step()
    functions = sum(len(names) for names in seen.values())
    print(f"one default training step: {len(seen)} files, {functions} functions (closures and methods counted)")
    for package in PACKAGES:
        files = [path for path in seen if path.startswith(package + "/")]
        print(f"  of which {package}: {len(files)} files, {sum(len(seen[f]) for f in files)} functions")
    for path in sorted(seen, key=lambda p: -len(seen[p])):
        print(f"  {len(seen[path]):3d}  {path}")


if __name__ == "__main__":
    main()
