"""Fixed-seed runs through the public CLI, fingerprinted, to show that a refactoring changed no number.

Each case trains the built-in `steps` student from its teacher for a few steps through
`python -m fire_opd train` (one process, or two under torchrun) and reduces the run to a
fingerprint: the SHA-256 of the final weights (every tensor's bytes, by name) and of every
training step's logged metrics except wall-clock times. Record the fingerprints on the code before a change, run
again after it and compare:

    python benchmarks/check_identical.py --write benchmarks/results/restructure-identity/before.json
    python benchmarks/check_identical.py --write after.json \
        --compare benchmarks/results/restructure-identity/before.json

Bit-identical means bit-identical on one machine with one thread count: CPU reductions depend on
both, so compare fingerprints made on the same machine (every case fixes `threads: 1`). Each file
records the CPU and torch it was made with, and `--compare` says so when they are not this
machine's: then every case differs whatever the code, and both revisions must be run here.
The cases cover what a restructuring of the trainer can break: both objectives, each statistics
scope, the filter's group scope, JSD, two routed teachers, a resume, and under torchrun DDP,
FSDP and vocab_parallel (every world-size factor of the loss and the gradient).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _results import cpu

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks" / "results" / "restructure-identity"
ASSETS_ROOT = next(p for p in (ROOT / "fire_opd" / "demo" / "assets", ROOT / "fire_opd" / "assets") if p.exists())
ASSETS = ASSETS_ROOT / "steps"
TOKENIZER = ASSETS_ROOT / "chain" / "tokenizer"

# every case: 4 steps of 8 prompts x 2 samples, evaluation at steps 2 and 4 on 16 problems
COMMON = [
    "steps=4",
    "prompts_per_step=8",
    "samples_per_prompt=2",
    "max_new_tokens=24",
    "micro_batch_size=6",
    "eval_every=2",
    "eval_size=16",
    "warmup_steps=1",
    "lr=1e-3",
    "threads=1",
    "tensorboard=false",
    "progress=false",
    "seed=3",
]
CASES: dict[str, dict] = {
    "full_vocab-fire": {},
    "sampled-fire-micro_batch": {"set": ["objective=sampled", "stats_scope=micro_batch"]},
    "full_vocab-filter_only-group-jsd": {
        "set": ["method=filter_only", "filter_scope=group", "divergence=jsd", "teacher_confidence_gate=0.1"]
    },
    "sampled-reweight_only-seq_mean": {
        "set": ["objective=sampled", "method=reweight_only", "loss_agg_mode=seq-mean-token-mean"]
    },
    "two-teachers": {"teachers": ["a", "b"]},
    "resume": {"resume": True},
    "ddp-2": {"nproc": 2, "set": ["rollout_chunk_prompts=4"]},
    "fsdp-2-sampled": {"nproc": 2, "set": ["rollout_chunk_prompts=4", "parallel=fsdp", "objective=sampled"]},
    "vocab_parallel-2": {"nproc": 2, "set": ["rollout_chunk_prompts=4", "vocab_parallel=true"]},
}
TIMING_KEYS = ("time/", "train/tokens_per_s")


def run_case(name: str, spec: dict, work: Path) -> dict:
    out = work / name
    teachers = spec.get("teachers", ["default"])
    prompts = HERE / "prompts.jsonl"
    if len(teachers) > 1:  # the same prompts, dealt to the teachers in turn
        rows = [json.loads(line) for line in prompts.read_text().splitlines()]
        prompts = work / f"{name}.jsonl"
        prompts.write_text(
            "".join(json.dumps({**row, "teacher": teachers[i % len(teachers)]}) + "\n" for i, row in enumerate(rows))
        )
    args = [
        "--student",
        str(ASSETS / "student_init"),
        "--tokenizer",
        str(TOKENIZER),
        "--prompts",
        str(prompts),
        "--eval-prompts",
        str(HERE / "eval.jsonl"),
        "--output-dir",
        str(out),
        "--overwrite",
    ]
    for teacher in teachers:
        args += ["--teacher", f"{teacher}={ASSETS / 'teacher'}" if teacher != "default" else str(ASSETS / "teacher")]
    sets = COMMON + spec.get("set", [])
    nproc = spec.get("nproc", 1)
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            "29531",
            "-m",
            "fire_opd",
        ]
        if nproc > 1
        else [sys.executable, "-m", "fire_opd"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

    def train(extra: list[str]) -> None:
        cmd = launcher + ["train"] + args + [x for s in sets + extra for x in ("--set", s)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name}: {' '.join(cmd)}\n{done.stderr[-3000:]}")

    if spec.get("resume"):
        # the whole run, then the same run taken up again from its step-2 checkpoint
        train(["save_every=2"])
        first = _fingerprint(out)
        shutil.rmtree(out / "final")
        train(["save_every=2", "resume_from=latest"])
        result = _fingerprint(out)
        result["matches_uninterrupted"] = first["weights"] == result["weights"]
        return result
    train([])
    return _fingerprint(out)


def _fingerprint(out: Path) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(out / "final" / "model.safetensors"))
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # the training steps' rows (a row at step 0, the initial evaluation, came after 68c95db)
    rows = [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows if row.get("train/step")]
    last = rows[-1] if rows else {}
    return {
        "weights": digest.hexdigest(),
        "metrics": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
        "steps_logged": len(rows),
        "final_loss": last.get("train/loss"),
        "final_eval_accuracy": last.get("eval/accuracy"),
    }


def _described(machine: dict | None) -> str:
    if not machine:
        return "a machine it does not record (files before 2026-12-07)"
    return f"{machine['cpu']} with torch {machine['torch']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", help="write the fingerprints to this JSON file")
    parser.add_argument("--compare", help="compare with fingerprints written before; exit 1 on any difference")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.cases:
            results[name] = run_case(name, CASES[name], Path(work))
            print(
                f"{name:34s} weights {results[name]['weights'][:16]}  metrics {results[name]['metrics'][:16]}  "
                f"loss {results[name]['final_loss']}",
                flush=True,
            )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "fire_opd", "fire_kernels"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    machine = {"cpu": cpu(), "torch": torch.__version__}
    record = {"commit": commit.strip() + ("+dirty" if dirty else ""), "machine": machine, "cases": results}
    if args.write:
        Path(args.write).write_text(json.dumps(record, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        if before.get("machine") != machine:
            print(
                f"note: {args.compare} was made on {_described(before.get('machine'))}, this run on "
                f"{_described(machine)}: fingerprints are comparable on one machine only",
                flush=True,
            )
        diffs = [
            name
            for name in results
            if before["cases"].get(name, {}).get("weights") != results[name]["weights"]
            or before["cases"].get(name, {}).get("metrics") != results[name]["metrics"]
        ]
        print(
            f"against {args.compare} (commit {before['commit']}): "
            + (f"DIFFERENT: {', '.join(diffs)}" if diffs else f"all {len(results)} cases bit-identical")
        )
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
