"""Build the demo's shipped assets: tokenizer, two tiny teachers and a weak student.

    python -m fire_opd.demo.build_assets [--out fire_opd/demo/assets] [--quick]

Everything is made here, on the CPU, from the built-in task suite (fire_opd/train/data.py):
  tokenizer/        character-level tokenizer (`tokenizers` WordLevel, Hugging Face format)
  teacher_arith/    LlamaForCausalLM trained to solve multi-step arithmetic
  teacher_reverse/  LlamaForCausalLM trained to reverse digit strings
  student_init/     a LlamaForCausalLM of the teachers' size with a short supervised warm-up on
                    both tasks: it knows the answer format but is often wrong (the distillation
                    starts here). A smaller student learns too slowly from on-policy signal to
                    show anything in a few CPU minutes.
Checkpoints are float32 safetensors. Training uses only the training split; the demo
evaluates on the held-out split. Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from fire_opd.demo import ASSETS
from fire_opd.demo.tasks import (
    CHAIN_ALPHABET,
    TASK_ALPHABET,
    chain_rewrite,
    chain_solution,
    chain_steps,
    chain_steps_after_error,
    chain_terms,
    sample_problems,
)
from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
from fire_opd.train.data import Problem
from fire_opd.train.evaluate import accuracy
from fire_opd.train.models import load_causal_lm, load_tokenizer
from fire_opd.train.rollouts import generate_rollouts

ASSETS_DIR = ASSETS  # fire_opd/demo/assets

# name: (tasks, hidden, layers, heads, sft steps, learning rate, seed)
MODELS = {
    "teacher_arith": (["arith"], 96, 3, 4, 1500, 3e-3, 1),
    "teacher_reverse": (["reverse"], 96, 3, 4, 1200, 3e-3, 2),
    "student_init": (["arith", "reverse"], 96, 3, 4, 200, 2e-3, 3),
}


# A solution for supervised warm-up: its text, or (text, k) where the first k solution tokens
# are context only (no loss on them): the model learns to continue such a prefix without
# learning to write it.
Solution = Union[str, tuple[str, int]]


def _sft_batch(
    tokenizer, problems: list[Problem], solutions: list[Solution]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + solution + <eos>; labels on the solution (past its unsupervised
    prefix) and <eos>."""
    rows, label_rows = [], []
    for p, solution in zip(problems, solutions):
        text, unsupervised = (solution, 0) if isinstance(solution, str) else solution
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        label_rows.append([-100] * (len(prompt) + unsupervised) + target[unsupervised:])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return ids, mask, labels


def supervised_warmup(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    steps: int,
    lr: float,
    batch_size: int = 256,
    seed: int = 0,
    log_every: int = 100,
    solution_fn: Optional[Callable[[Problem, random.Random], Solution]] = None,
) -> float:
    """Plain next-token cross-entropy on worked solutions, AdamW with cosine decay.

    `solution_fn(problem, rng)` draws a fresh solution each time a problem is used (tasks with
    several valid solutions); by default the problem's own `solution`."""
    gen = torch.Generator().manual_seed(seed)
    solution_rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(problems), (batch_size,), generator=gen)
        batch = [problems[i] for i in idx.tolist()]
        solutions = [solution_fn(p, solution_rng) if solution_fn else p.solution for p in batch]
        ids, mask, labels = _sft_batch(tokenizer, batch, solutions)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"    step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return float(loss.detach())


def build(out_dir: Path, *, quick: bool = False, only: Optional[list[str]] = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = build_char_tokenizer(TASK_ALPHABET, out_dir / "tokenizer")
    tokenizer.padding_side = "left"
    manifest = out_dir / "MANIFEST.json"
    report = json.loads(manifest.read_text()) if only and manifest.is_file() else {}
    for name, (tasks, hidden, layers, heads, steps, lr, seed) in MODELS.items():
        if only and name not in only:
            continue
        steps = 3 if quick else steps
        t0 = time.time()
        train = sample_problems(tasks, 500 if quick else 20_000, seed=seed, split="train")
        held_out = sample_problems(tasks, 16 if quick else 400, seed=seed + 100, split="test")
        model = tiny_llama(
            len(tokenizer),
            hidden,
            layers,
            heads,
            seed=seed,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
        )
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(train)} training problems")
        supervised_warmup(model, tokenizer, train, steps=steps, lr=lr, seed=seed)
        scores = {task: accuracy(model, tokenizer, [p for p in held_out if p.teacher == task]) for task in tasks}
        print(f"  held-out accuracy {scores} ({time.time() - t0:.0f}s)")
        model.save_pretrained(str(out_dir / name), safe_serialization=True)
        report[name] = {"tasks": tasks, "held_out_accuracy": scores, "sft_steps": steps, "seed": seed}
    manifest.write_text(json.dumps(report, indent=1) + "\n")
    return report


# The "chain" setting (the paper's regime, one model family): a teacher trained on all three
# solution formats, and a smaller student of the same architecture trained on the teacher's own
# sampled solutions (sequence-level distillation), so that it starts close to the teacher.
# name: (hidden, layers, heads, sft steps, learning rate, seed)
CHAIN_MODELS = {
    "teacher": (96, 4, 4, 2500, 2e-3, 11),
    "student_init": (64, 3, 4, 1000, 2e-3, 12),
}
CHAIN_MAX_NEW_TOKENS = 48
CHAIN_MAX_POSITIONS = 96


def redraw_chain_solution(problem: Problem, rng: random.Random) -> str:
    return chain_solution(chain_terms(problem.prompt), rng)


@torch.no_grad()
def teacher_samples(teacher, tokenizer, problems: list[Problem], *, seed: int, batch_size: int = 512) -> list[Problem]:
    """The teacher's own temperature-1 completions of `problems` (those that end with EOS),
    right or wrong, as solutions: what the student imitates before distillation starts."""
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollouts = generate_rollouts(
            teacher, tokenizer, [p.prompt for p in chunk], max_new_tokens=CHAIN_MAX_NEW_TOKENS, temperature=1.0
        )
        finished = (rollouts.response_ids == tokenizer.eos_token_id).any(dim=1)
        out += [replace(p, solution=text) for p, text, ok in zip(chunk, rollouts.texts, finished.tolist()) if ok]
    return out


def build_chain(out_dir: Path, *, quick: bool = False, student_only: bool = False) -> dict:
    """Tokenizer, teacher and student of the "chain" setting under `out_dir` (`student_only`:
    keep the tokenizer and teacher already there, rebuild the student from the teacher's samples)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "MANIFEST.json"
    if student_only:
        tokenizer = load_tokenizer(out_dir / "tokenizer")
        teacher = load_causal_lm(out_dir / "teacher")
        report = json.loads(manifest.read_text()) if manifest.is_file() else {}
    else:
        tokenizer = build_char_tokenizer(CHAIN_ALPHABET, out_dir / "tokenizer")
        teacher, report = None, {}
    tokenizer.padding_side = "left"
    train = sample_problems(["chain"], 500 if quick else 20_000, seed=11, split="train")
    held_out = sample_problems(["chain"], 16 if quick else 400, seed=111, split="test")
    for name, (hidden, layers, heads, steps, lr, seed) in CHAIN_MODELS.items():
        if student_only and name == "teacher":
            continue
        steps = 3 if quick else steps
        t0 = time.time()
        model = tiny_llama(
            len(tokenizer),
            hidden,
            layers,
            heads,
            seed=seed,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
            max_positions=CHAIN_MAX_POSITIONS,
        )
        if teacher is None:
            problems, solution_fn = train, redraw_chain_solution
        else:
            problems, solution_fn = teacher_samples(teacher, tokenizer, train, seed=seed), None
        trained_on = "teacher samples" if teacher is not None else "all three formats"
        report[name] = _train_chain_model(
            f"chain/{name}", out_dir / name, model, tokenizer, problems, held_out, solution_fn, trained_on,
            steps=steps, lr=lr, seed=seed, t0=t0,
        ) | {"hidden": hidden, "layers": layers}  # fmt: skip
        teacher = teacher or model
    manifest.write_text(json.dumps(report, indent=1) + "\n")
    return report


# The "steps" setting (the default demo): the chain teacher fine-tuned to one solution format
# ("steps", one binary operation per step), and a smaller student of the same family trained
# briefly on that teacher's own samples: well posed (one family, one format, a teacher that does
# not drift between formats), and the student starts far enough below the teacher to show
# distillation working.
# The "brittle-teacher" setting (FiRe's premise, built to hold): a teacher accurate on its own
# solutions ("steps") that never starts a "rewrite" solution but, once one is started, continues it
# confidently wrong (`chain_rewrite(ignore_signs=True)`), and a student that writes both formats.
# name: (base model to fine-tune, or (hidden, layers, heads) for a new one; sft steps; lr; seed)
STEPS_MODELS = {
    "steps/teacher": ("chain/teacher", 300, 1e-3, 21),
    "steps/student_init": ((64, 3, 4), 500, 2e-3, 22),
    "brittle/teacher": ("steps/teacher", 400, 1e-3, 23),
    "brittle/student_init": ((64, 3, 4), 500, 2e-3, 24),
    "cascade/teacher": ("steps/teacher", 2000, 1e-3, 25),
}
BRITTLE_REWRITE_SHARE = 0.5  # of the brittle teacher's training solutions, and of its student's
# The "error-cascade" setting (issue 30): the steps teacher also taught to continue, after a running
# value restated wrongly in the middle of a chain, confidently wrong (`chain_steps_after_error`).
# The student is steps' own: its copy errors, anywhere in a chain, lead into the teacher's
# unreliable region, and no single token choice keeps it out (unlike brittle-teacher's format
# token). A first version injected wrong *results* instead: the 4-layer teacher could not tell a
# wrong result from a right one (0.75 / 0.73 held-out accuracy on its own chains after 400 / 1200
# steps, and right arithmetic on 0.89 of its steps after the student's errors), so it went wrong on
# its own chains too; a wrongly restated value is seen by comparing it with the result before it.
# That teacher needs its 2000 steps: after 800 it still added |t| on 19 % of its own chains (0.81
# held-out accuracy); after 2000 it solves 0.99.
CASCADE_ERROR_SHARE = 0.5  # of the cascade teacher's training solutions


def steps_solution(problem: Problem, rng: random.Random) -> str:
    return chain_steps(chain_terms(problem.prompt), rng)


def brittle_teacher_solution(problem: Problem, rng: random.Random) -> Solution:
    """Half "steps" (learned whole), half wrong "rewrite" continuations whose first token, the
    format decision, carries no loss: the teacher never opens a rewrite, but continues one."""
    terms = chain_terms(problem.prompt)
    if rng.random() < BRITTLE_REWRITE_SHARE:
        return chain_rewrite(terms, ignore_signs=True), 1
    return chain_steps(terms, rng)


def cascade_teacher_solution(problem: Problem, rng: random.Random) -> Solution:
    """Half "steps" solutions (learned whole), half continuations after a wrongly restated value
    (the error itself carries no loss: the teacher does not learn to make it)."""
    terms = chain_terms(problem.prompt)
    if rng.random() < CASCADE_ERROR_SHARE:
        return chain_steps_after_error(terms, rng)
    return chain_steps(terms, rng)


def build_steps(out_dir: Path, *, quick: bool = False, only: Optional[list[str]] = None) -> dict:
    """The "steps" and "brittle-teacher" settings' models under `out_dir` (the chain folder's
    parent: they share the chain tokenizer and start from the chain teacher)."""
    tokenizer = load_tokenizer(out_dir / "chain" / "tokenizer")
    tokenizer.padding_side = "left"
    manifest = out_dir / "MANIFEST.json"
    report = json.loads(manifest.read_text()) if manifest.is_file() else {}
    train = sample_problems(["chain"], 500 if quick else 20_000, seed=21, split="train")
    held_out = sample_problems(["chain"], 16 if quick else 400, seed=121, split="test")
    for name, (base, steps, lr, seed) in STEPS_MODELS.items():
        if only and name not in only:
            continue
        steps = 3 if quick else steps
        t0 = time.time()
        if isinstance(base, str):
            model = load_causal_lm(out_dir / base)
        else:
            hidden, layers, heads = (int(x) for x in base)
            model = tiny_llama(
                len(tokenizer),
                hidden,
                layers,
                heads,
                seed=seed,
                pad_id=tokenizer.pad_token_id,
                eos_id=tokenizer.eos_token_id,
                max_positions=CHAIN_MAX_POSITIONS,
            )
        problems, trained_on = train, ""
        solution_fn: Optional[Callable[[Problem, random.Random], Solution]] = None
        if name == "steps/teacher":
            solution_fn, trained_on = steps_solution, "steps solutions"
        elif name == "brittle/teacher":
            solution_fn, trained_on = brittle_teacher_solution, "steps + wrong rewrite continuations"
        elif name == "cascade/teacher":
            solution_fn = cascade_teacher_solution
            trained_on = "steps + wrong continuations after a wrongly restated value"
        else:
            teacher = load_causal_lm(out_dir / "steps/teacher")
            problems = teacher_samples(teacher, tokenizer, train[: 100 if quick else 8000], seed=seed)
            trained_on = "steps teacher samples"
            if name == "brittle/student_init":  # half of its solutions are (correct) rewrites
                rng = random.Random(seed)
                problems = [
                    replace(p, solution=chain_rewrite(chain_terms(p.prompt)))
                    if rng.random() < BRITTLE_REWRITE_SHARE
                    else p
                    for p in problems
                ]
                trained_on += " and correct rewrites"
        report[name] = _train_chain_model(
            name, out_dir / name, model, tokenizer, problems, held_out, solution_fn, trained_on,
            steps=steps, lr=lr, seed=seed, t0=t0,
        ) | {"base": base if isinstance(base, str) else "new"}  # fmt: skip
    manifest.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _train_chain_model(
    name: str,
    folder: Path,
    model,
    tokenizer,
    problems: list[Problem],
    held_out: list[Problem],
    solution_fn: Optional[Callable[[Problem, random.Random], Solution]],
    trained_on: str,
    *,
    steps: int,
    lr: float,
    seed: int,
    t0: float,
) -> dict:
    """Supervised warm-up of one chain-task model, its held-out accuracy, the saved folder and
    its manifest entry."""
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(problems)} problems ({trained_on})")
    supervised_warmup(
        model, tokenizer, problems, steps=steps, lr=lr, seed=seed, solution_fn=solution_fn, batch_size=128
    )
    score = accuracy(model, tokenizer, held_out, max_new_tokens=CHAIN_MAX_NEW_TOKENS)
    print(f"  held-out accuracy {score:.3f} ({time.time() - t0:.0f}s)")
    model.save_pretrained(str(folder), safe_serialization=True)
    return {
        "tasks": ["chain"],
        "held_out_accuracy": {"chain": score},
        "sft_steps": steps,
        "seed": seed,
        "trained_on": trained_on,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    parser.add_argument("--quick", action="store_true", help="three steps each (a smoke test of this script)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*sorted(MODELS), "chain", "chain_student", *STEPS_MODELS],
        help='rebuild only these models ("chain": the chain setting\'s tokenizer and models; '
        '"chain_student": its student, from the teacher already built; steps/... and '
        "brittle/... and cascade/...: one model of the steps, brittle-teacher and error-cascade settings)",
    )
    args = parser.parse_args(argv)
    only = set(args.only or [])
    arith = sorted(only & set(MODELS))
    if not only or arith:
        build(args.out, quick=args.quick, only=arith or None)
    if not only or {"chain", "chain_student"} & only:
        build_chain(args.out / "chain", quick=args.quick, student_only="chain" not in only and bool(only))
    steps = sorted(only & set(STEPS_MODELS), key=list(STEPS_MODELS).index)
    if not only or steps:
        build_steps(args.out, quick=args.quick, only=steps or None)


if __name__ == "__main__":
    main()
