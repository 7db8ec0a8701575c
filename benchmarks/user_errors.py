"""The mistakes a new user makes, as `fire-opd` answers them: each command run for real, its stderr.

Writes benchmarks/results/user-errors.txt, which docs/training.md includes as it is. Each command
should end with one line on stderr and exit status 2 before any model loads; the script says so
when one does not. In a temporary folder where `assets` links to the shipped demo models:

    python benchmarks/user_errors.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "user-errors.txt"

GOOD = "--student assets/student_init --teacher arith=assets/teacher_arith --tokenizer assets/tokenizer"
COMMANDS = [
    "fire-opd train --student /path/that/does/not/exist --teacher assets/teacher_arith --prompts train.jsonl",
    "fire-opd eval --model assets/teacher_arith --prompts train.jsonl",
    f"fire-opd train {GOOD} --prompts broken.jsonl",
    "fire-opd train --config distill.yaml --set no_such_field=1",
    "fire-opd train --config distill.yaml --prompts missing.jsonl",
    "fire-opd train --config typo.yaml",
    "fire-opd train --config distill.yaml --set optim.lr=fast",
    "fire-opd train --student assets/student_init --teacher assets/teacher_arith --tokenizer assets/tokenizer "
    "--prompts train.jsonl",
    "fire-opd train --config distill.yaml --teacher arith=assets/chain/teacher",
    "fire-opd train --config distill.yaml --prompts chat.jsonl --tokenizer plain_tokenizer",
    "fire-opd train --student assets/student_init --teacher arith=assets/teacher_arith --prompts train.jsonl",
    "fire-opd train --config distill.yaml --output-dir runs/old",
    "fire-opd train --config distill.yaml --set data.verifier=my_rewards:score",
    "fire-opd eval --model assets/teacher_arith --tokenizer assets/tokenizer --prompts train.jsonl --samples 8",
    "fire-opd train --config distill.yaml --prompts questions.csv",
    "fire-opd train --config distill.yaml --prompts questions.csv --set data.prompt_field=question "
    "--set data.prompts_split=test",
    "fire-opd train --config distill.yaml --prompts my-org/not-downloaded",
    "fire-opd train --config distill.yaml --set lora.r=16 --set lora.target_modules=[q_proj,query]",
]


def _setup(work: Path) -> None:
    from fire_opd.demo import ASSETS
    from fire_opd.demo.tasks import sample_problems
    from fire_opd.train.data import write_prompts

    (work / "assets").symlink_to(ASSETS)
    write_prompts(sample_problems(["arith"], 8, seed=0, split="train"), work / "train.jsonl")
    (work / "broken.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=" "answer": "4"}\n')
    (work / "distill.yaml").write_text(
        "models:\n  student: assets/student_init\n  teachers: {arith: assets/teacher_arith}\n"
        "  tokenizer: assets/tokenizer\ndata:\n  prompts: train.jsonl\n"
    )
    (work / "typo.yaml").write_text("models:\n  student: assets/student_init\nfire:\n  percentil: 20\n")
    (work / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+2="}], "answer": "3"}))
    plain = work / "plain_tokenizer"
    plain.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        config = json.loads((ASSETS / "tokenizer" / name).read_text())
        config.pop("chat_template", None)
        (plain / name).write_text(json.dumps(config))
    (work / "questions.csv").write_text("question,answer\n1+2=,3\n2+2=,4\n")
    old = work / "runs" / "old"
    old.mkdir(parents=True)
    (old / "metrics.jsonl").write_text("{}\n")


def main() -> int:
    lines, failures, seconds = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _setup(work)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for command in COMMANDS:
            argv = [sys.executable, "-m", "fire_opd", *command.split()[1:]]
            started = time.perf_counter()
            done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
            seconds.append(time.perf_counter() - started)
            err = [line for line in done.stderr.splitlines() if line.strip()]
            lines += [f"$ {command}", *err]
            if done.returncode != 2 or len(err) != 1:
                failures.append(f"{command}: exit {done.returncode}, {len(err)} stderr lines")
            print(f"$ {command}\n" + "\n".join(err) + f"\n({seconds[-1]:.1f} s)", flush=True)
    OUT.write_text("\n".join(lines) + "\n")  # without the times, which move with the machine's load
    ordered = sorted(seconds)
    print(
        f"{len(seconds)} commands: {ordered[0]:.1f} s to {ordered[-1]:.1f} s, median {ordered[len(ordered) // 2]:.1f} s"
    )
    for failure in failures:
        print(f"NOT ONE LINE AND EXIT 2: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
