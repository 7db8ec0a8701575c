"""1 vs K data-parallel processes (torchrun, gloo on this CPU): step time, tokens per second and
the bytes each process hands to collectives per step, measured, next to the formula.

    python benchmarks/bench_distributed.py [--processes 1 2] [--steps 4]

Modes: one process; with K processes DDP, FSDP2 (`parallel: fsdp`) and DDP with
vocabulary-parallel lm_heads (`vocab_parallel: true`). Models: the demo's shipped student and
teacher (V = 18, 0.28M parameters) and a random Llama-style pair with a Qwen-sized vocabulary
(V = 151,936, 79M-parameter student), saved to a
temporary folder and trained through `fire-opd train` exactly as a user would. Every process runs
one torch thread, so K processes use K cores; the global batch (prompts_per_step) is the same for
every K, so the step does the same work split K ways.

Formula: under DDP each process all-reduces its fp32 gradients once per step (4 P bytes for P
student parameters) plus O(rollouts) floats of FiRe statistics and metrics. Under FSDP2 the
payload is the parameters all-gathered for every forward (each decode step of generation, the
scoring pass, each micro-batch's forward and its backward: 4 P bytes each) plus one
reduce-scatter of the fp32 gradients (4 P). With vocab_parallel the lm_head's gradient leaves
DDP's all-reduce (4 (P - P_head) bytes) and the statistics gather every process's response
tokens instead: 4 n D per statistic (hidden states; the teacher's too) and 4 n D back in the
backward (dL/dh, all-reduced where gloo has no reduce-scatter), n the tokens of all processes,
plus the logits of each decode step exchanged between processes. A ring all-reduce of b bytes moves about
2 (K - 1) / K * b bytes in and out of each process, an all-gather or reduce-scatter (K - 1) / K * b.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

from _results import device_label, write_results  # noqa: E402


def _models(workdir: Path) -> dict[str, dict]:
    """name -> {student, teachers, tokenizer, prompts} folders on disk."""
    from fire_opd.demo.build_assets import ASSETS_DIR
    from fire_opd.demo.tasks import sample_problems
    from fire_opd.train.data import write_prompts

    write_prompts(sample_problems(["arith"], 256, seed=0, split="train"), workdir / "demo.jsonl")
    out = {
        "demo": {
            "student": str(ASSETS_DIR / "student_init"),
            "teachers": {"arith": str(ASSETS_DIR / "teacher_arith")},
            "tokenizer": str(ASSETS_DIR / "tokenizer"),
            "prompts": str(workdir / "demo.jsonl"),
            "prompts_per_step": 32,
            "samples_per_prompt": 4,
            "max_new_tokens": 8,
            "micro_batch_size": 32,
        }
    }
    from bench_train import _random_pair

    student, teachers, tokenizer, problems = _random_pair(151_936)
    folder = workdir / "random-152k"
    student.save_pretrained(str(folder / "student"))
    teachers["default"].save_pretrained(str(folder / "teacher"))
    tokenizer.save_pretrained(str(folder / "student"))
    write_prompts(problems, folder / "prompts.jsonl")
    out["random-152k"] = {
        "student": str(folder / "student"),
        "teachers": {"default": str(folder / "teacher")},
        "prompts": str(folder / "prompts.jsonl"),
        "prompts_per_step": 8,
        "samples_per_prompt": 2,
        "max_new_tokens": 24,
        "micro_batch_size": 8,
    }
    return out


MODES = {
    "ddp": {"parallel": "ddp"},
    "fsdp": {"parallel": "fsdp"},
    "ddp+vocab": {"parallel": "ddp", "vocab_parallel": True},
}  # mode -> config


def run(name: str, spec: dict, processes: int, steps: int, workdir: Path, parallel: str = "ddp") -> dict:
    config = {
        **spec,
        "steps": steps,
        **MODES[parallel],
        "rollout_chunk_prompts": spec["prompts_per_step"] // 2,
        "lr": 1e-5,
        "warmup_steps": 0,
        "eval_every": 0,
        "eval_size": 0,
        "progress": False,
        "tensorboard": False,
        "threads": 1,
        "seed": 0,
        "overwrite": True,
        "objective": "full_vocab",
    }
    cfg = workdir / f"{name}-{processes}-{parallel}.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(config))
    out_dir = workdir / f"run-{name}-{processes}-{parallel}"
    launcher = (
        [sys.executable, "-m", "fire_opd"]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "fire_opd",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [*launcher, "train", "--config", str(cfg), "--output-dir", str(out_dir)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        return {
            "model": name,
            "processes": processes,
            "parallel": parallel,
            "error": proc.stderr.strip().splitlines()[-1][:200],
        }
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()][1:]  # warm-up
    step_s = [r["time/sample_s"] + r["time/score_s"] + r["time/update_s"] for r in rows]
    return {
        "model": name,
        "processes": processes,
        "parallel": parallel,
        "step_s": statistics.median(step_s),
        "params_per_process": rows[-1]["train/student_params_per_process"],
        "teacher_params_per_process": rows[-1]["train/teacher_params_per_process"],
        "tokens_per_s": statistics.median(r["train/tokens"] / s for r, s in zip(rows, step_s)),
        "comm_bytes": statistics.median(r["train/comm_bytes"] for r in rows),
        "student_parameters": _parameters(spec["student"]),
    }


def _parameters(path: str) -> int:
    from safetensors import safe_open

    total = 0
    for shard in Path(path).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                numel = 1
                for n in f.get_slice(key).get_shape():
                    numel *= n
                total += numel
    return total


def _table(rows: list[dict]) -> str:
    lines = [
        "| model | student params | processes | parallel | student params per process | teacher params per "
        "process | step (s) | tokens/s | collective payload per process per step (MiB) | of which the "
        "gradients' all-reduce or reduce-scatter (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, mode = r["processes"], r["parallel"] if r["processes"] > 1 else "-"
        if "error" in r:
            lines.append(f"| {r['model']} | | {k} | {mode} | error: {r['error'][:80]} | | | | | |")
            continue
        params = r["student_parameters"]
        # DDP and FSDP reduce every fp32 gradient (4 P bytes); vocab_parallel all but its lm_head's,
        # whose size follows from the parameters a process holds: P - P_head (K - 1) / K
        head = (params - r["params_per_process"]) * k / (k - 1) if mode == "ddp+vocab" else 0
        grads = 4 * (params - head) if k > 1 else 0
        lines.append(
            f"| {r['model']} | {params / 1e6:.3g}M | {k} | {mode} | "
            f"{r['params_per_process'] / 1e6:.3g}M | {r['teacher_params_per_process'] / 1e6:.3g}M | "
            f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['comm_bytes'] / 2**20:.2f} | "
            f"{grads / 2**20:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is a warm-up")
    parser.add_argument("--models", nargs="+", default=["demo", "random-152k"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = _models(workdir)
        for name in args.models:
            for k in args.processes:
                for parallel in tuple(MODES) if k > 1 else ("ddp",):
                    rows.append(run(name, models[name], k, args.steps, workdir, parallel))
                    print(rows[-1], flush=True)
    table = _table(rows)
    print(table)
    write_results(args.out, "distributed", "Data-parallel steps (torchrun, gloo)", rows, table, device_label())
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
