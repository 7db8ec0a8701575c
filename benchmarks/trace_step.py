"""How much code one default training step runs: the distinct files and functions (closures
counted; generator expressions and lambdas not) of fire_opd and fire_kernels that
`FireOPDTrainer.train_step` enters, as a cold reader following the step would have to read them,
and how long their bodies are (lines, docstrings left out).

    python benchmarks/trace_step.py                # one step of the default recipe, one process
    python benchmarks/trace_step.py --tree         # and the call tree a reader follows from train_step
    python benchmarks/trace_step.py --collectives  # the collectives one step calls, 2 processes (torchrun)

The step is the default recipe's (dense objective, FiRe-OPD, chunked kernels) on tiny models; the
trainer is set up first and only the step is traced (`sys.setprofile`). Run it on two commits to
compare them (issue 29 did: 793dc85 against its final commit).
"""

from __future__ import annotations

import argparse
import ast
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fire_opd", "fire_kernels")


def _package_function(frame) -> Optional[str]:
    """ "file:qualname" of a frame of fire_opd / fire_kernels code (None for any other frame, and for
    generator expressions, lambdas and comprehensions)."""
    try:
        relative = Path(frame.f_code.co_filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    name = frame.f_code.co_qualname
    return f"{relative}:{name}" if relative.parts[0] in PACKAGES and not name.endswith(">") else None


def default_trainer(out: str):
    """The default recipe's trainer on tiny models, writing to `out`."""
    from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
    from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
    from fire_opd.train.config import TrainConfig, dotted
    from fire_opd.train.trainer import FireOPDTrainer

    tokenizer = build_char_tokenizer(TASK_ALPHABET)

    def model(seed: int, hidden: int):
        return tiny_llama(
            len(tokenizer), hidden, 1, 2, seed=seed, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id
        )

    settings = dict(output_dir=out, steps=1, prompts_per_step=4, samples_per_prompt=2, micro_batch_size=4)
    config = TrainConfig.from_dict(
        {"logging.report_to": [], "logging.progress": False, "eval.at_start": False, **dotted(settings)}
    )
    return FireOPDTrainer(
        config,
        student=model(0, 32),
        teachers={"arith": model(1, 48)},
        tokenizer=tokenizer,
        train_problems=sample_problems(("arith",), 40, seed=1, split="train"),
        eval_problems=[],
    )


def traced_step() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, int]]:
    """({file: {function}}, {caller: {callee}}, {function: first line}) of the package code one
    `train_step` enters; a callee's caller is the nearest package function below it on the stack
    (torch in between is skipped), each named "file:qualname"."""
    with tempfile.TemporaryDirectory() as out:
        trainer = default_trainer(out)
        seen: dict[str, set[str]] = collections.defaultdict(set)
        calls: dict[str, set[str]] = collections.defaultdict(set)
        first_lines: dict[str, int] = {}

        def profile(frame, event, _arg):
            if event != "call" or (callee := _package_function(frame)) is None:
                return
            path, name = callee.split(":", 1)
            seen[path].add(name)
            first_lines[callee] = frame.f_code.co_firstlineno
            caller, caller_name = frame.f_back, None
            while caller is not None and (caller_name := _package_function(caller)) is None:
                caller = caller.f_back
            if caller_name is not None:
                calls[caller_name].add(callee)

        sys.setprofile(profile)
        try:
            trainer.train_step()
        finally:
            sys.setprofile(None)
        trainer.close()
    return seen, calls, first_lines


def body_lines(first_lines: dict[str, int]) -> dict[str, int]:
    """The lines of each function's body, its docstring left out ("file:qualname" -> lines), from
    the source: how much a reader who opens it reads."""
    sizes = {}
    trees: dict[str, ast.Module] = {}
    for function, first in first_lines.items():
        path = function.split(":", 1)[0]
        tree = trees.setdefault(path, ast.parse((ROOT / path).read_text()))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if start == first:
                    body = node.body
                    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                        body = body[1:]  # the docstring
                    sizes[function] = (node.end_lineno or body[-1].lineno) - body[0].lineno + 1
                    break
    return sizes


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")


def counted_collectives() -> None:
    """Under torchrun: count the calls of each `torch.distributed` collective during the second
    step (the first builds DDP's buckets) of the default recipe, and print rank 0's. DDP's
    gradient buckets go through its reducer, not these functions, and are not counted."""
    import torch.distributed as dist

    calls: collections.Counter[str] = collections.Counter()
    counting = [False]

    def counted(name, collective):
        def call(*args, **kwargs):
            if counting[0]:
                calls[name] += 1
            return collective(*args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    with tempfile.TemporaryDirectory() as out:
        trainer = default_trainer(out)
        trainer.train_step()
        trainer.step += 1
        counting[0] = True
        trainer.train_step()
        counting[0] = False
        if trainer.is_main:
            print(f"collectives one step calls, per process (2 processes): {sum(calls.values())}")
            for name, n in calls.most_common():
                print(f"  {n:3d}  dist.{name}")
        trainer.close()


def print_tree(calls: dict[str, set[str]], root: str) -> None:
    """The call tree from `root`, depth first; a function met again is marked, not expanded."""
    shown: set[str] = set()

    def visit(node: str, depth: int) -> None:
        again = node in shown
        print(f"{'  ' * depth}{node}{'  (above)' if again and calls.get(node) else ''}")
        if again:
            return
        shown.add(node)
        for child in sorted(calls.get(node, ())):
            if child != node:
                visit(child, depth + 1)

    visit(root, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="store_true", help="also print the call tree from train_step")
    parser.add_argument("--collectives", action="store_true", help="count one step's collectives, 2 processes")
    args = parser.parse_args()
    if args.collectives:
        if "WORLD_SIZE" in os.environ:
            counted_collectives()
        else:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
            one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run([*launch, __file__, "--collectives"], check=True, env=one_thread)
        return
    seen, calls, first_lines = traced_step()
    functions = sum(len(names) for names in seen.values())
    callers = {caller for caller, callees in calls.items() if callees - {caller}}
    print(f"one default training step: {len(seen)} files, {functions} functions (closures and methods counted)")
    print(f"  of which {len(callers)} call further package functions, {functions - len(callers)} are leaves")
    for package in PACKAGES:
        files = [path for path in seen if path.startswith(package + "/")]
        print(f"  of which {package}: {len(files)} files, {sum(len(seen[f]) for f in files)} functions")
    sizes = list(body_lines(first_lines).values())
    bands = {"1-3": (1, 3), "4-15": (4, 15), "16-50": (16, 50), "51+": (51, 10**9)}
    shares = ", ".join(f"{sum(low <= n <= high for n in sizes)} of {name}" for name, (low, high) in bands.items())
    print(f"  body lines (docstring aside): {shares}; {sum(sizes)} lines in all")
    for path in sorted(seen, key=lambda p: -len(seen[p])):
        print(f"  {len(seen[path]):3d}  {path}")
    if args.tree:
        print_tree(calls, "fire_opd/train/trainer.py:FireOPDTrainer.train_step")


if __name__ == "__main__":
    main()
