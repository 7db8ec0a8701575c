"""One FiRe-OPD trainer step (sample, score, update): fused path against the materialized path.

    python benchmarks/bench_train.py [--quick] [--steps 3]

Models: the demo's shipped tiny teacher and student (V = 18), a random Llama-style pair
with a Qwen-sized vocabulary (V = 151,936) where the lm_head dominates, and a random ~100M-parameter
Llama student and teacher built from a config (`llama-100m`: 12 layers, d = 640, V = 32,000), run
on the fused path with and without the student's gradient checkpointing, and as a LoRA student
(`--lora-memory`: full fine-tuning against LoRA r = 16 on all linear layers), and in three
precisions (`--precision`: float32, bf16 updated in place, bf16 with float32 master weights,
with the share of the trained weights that moved). Paths:
  fused       backend chunked (auto on CPU), fused student update (fire-opd's default)
  reference   backend reference: materialized [tokens, V] logits and autograd
Each (model, path) runs in a fresh process: median step time over --steps after one warm-up
step, the time split into sample / score / update, and memory above the process after loading the
models: the peak of tensor memory allocated during one more (untimed) step under the profiler
(CUDA: the allocator's peak), with peak RSS as a second opinion.

Each path runs with both training objectives (`--objectives`): "sampled" (the PPO surrogate on
the sampled token) and "full_vocab" (the exact per-token reverse KL; its update also recomputes
the teacher's hidden states, one no-grad teacher forward per micro-batch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _memory import reset_peak_rss, status_bytes, tensor_peak_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _random_pair(vocab: int, size: str = "tiny"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fire_opd.demo.tiny_models import tiny_llama
    from fire_opd.train.data import Problem

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    if size == "100m":  # 41M embedding + head, 12 x 5.1M layers: 102M parameters each
        student, teacher = (_llama_100m(vocab, seed) for seed in (0, 1))
    else:
        student = tiny_llama(vocab, 256, 2, 4, seed=0, pad_id=0, eos_id=1, max_positions=128)
        teacher = tiny_llama(vocab, 384, 2, 4, seed=1, pad_id=0, eos_id=1, max_positions=128)
    import random

    rng = random.Random(0)
    problems = [Problem(" ".join(f"t{rng.randrange(3, vocab)}" for _ in range(12)), "t3") for _ in range(64)]
    return student, {"default": teacher}, tok, problems


def _llama_100m(vocab: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=640,
        intermediate_size=1792,
        num_hidden_layers=12,
        num_attention_heads=10,
        num_key_value_heads=10,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _demo_pair():
    from fire_opd.demo.build_assets import ASSETS_DIR
    from fire_opd.demo.tasks import sample_problems
    from fire_opd.train.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(ASSETS_DIR / "tokenizer")
    return (
        load_causal_lm(ASSETS_DIR / "student_init"),
        {"arith": load_causal_lm(ASSETS_DIR / "teacher_arith")},
        tok,
        sample_problems(["arith"], 512, seed=0, split="train"),
    )


def worker(args) -> dict:
    import time

    import torch

    from fire_opd.train.config import TrainConfig
    from fire_opd.train.trainer import FireOPDTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    student, teachers, tok, problems = (
        _demo_pair()
        if args.model == "demo"
        else _random_pair(32_000, "100m")
        if args.model == "llama-100m"
        else _random_pair(151_936)
    )
    fused = args.path == "fused"
    big = args.model != "demo"
    objective = args.objective
    config = TrainConfig.from_dict(
        {
            "optim.steps": args.steps + 1,
            "sampling.prompts_per_step": 8 if big else 32,
            "sampling.samples_per_prompt": 2 if big else 4,
            "optim.micro_batch_size": 8 if big else 64,
            "sampling.max_new_tokens": 24 if big else 8,
            "optim.lr": 1e-5,
            "optim.warmup_steps": 0,
            "eval.every": 0,
            "eval.size": 0,
            "logging.progress": False,
            "logging.report_to": [],
            "runtime.backend": "auto" if fused else "reference",
            "runtime.fused_update": fused,
            "output_dir": "/tmp/fire-bench",
            "checkpoint.overwrite": True,
            "runtime.device": args.device,
            "loss.objective": objective,
            "models.gradient_checkpointing": args.checkpointing,
            "lora.r": args.lora,
            "models.dtype": args.dtype,
            "optim.master_weights": not args.in_place,
        }
    )
    trainer = FireOPDTrainer(
        config, student=student, teachers=teachers, tokenizer=tok, train_problems=problems, eval_problems=[]
    )
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if not cuda:
        reset_peak_rss()  # the peak excludes model loading
    base = torch.cuda.memory_allocated() if cuda else status_bytes("VmRSS")
    start = {name: p.detach().float().clone() for name, p in trainer.student.named_parameters() if p.requires_grad}
    steps, parts, tokens = [], [], []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        trainer.step += 1
        if cuda:
            torch.cuda.synchronize()
        if i:
            steps.append(time.perf_counter() - t0)
            parts.append({k: metrics[f"time/{k}_s"] for k in ("sample", "score", "update")})
            tokens.append(metrics["train/response_length"] * config.sampling.rollouts_per_step)
    if cuda:
        tensor_peak = torch.cuda.max_memory_allocated() - base
        rss_peak = None
    else:
        rss_peak = max(0, status_bytes("VmHWM") - base)

        def one_step():
            trainer.train_step()
            trainer.step += 1

        tensor_peak, _ = tensor_peak_bytes(one_step)  # one more step under the profiler (not timed)
    trainer.close()
    moved = total = 0
    for name, p in trainer.student.named_parameters():  # the trained weights: a bf16 student's float32 masters
        if name in start:
            weights = trainer.optimizer.state.get(p, {}).get("master", p).detach().float()
            moved += int((weights != start[name]).sum())
            total += p.numel()
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    trainable = [p for p in trainer.student.parameters() if p.requires_grad]
    return {
        "trainable_parameters": sum(p.numel() for p in trainable),
        # what a step keeps between steps besides the weights: AdamW's two moments of each trainable weight
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
        # and what each step adds at its peak: a gradient per trainable weight, activations, the loss sweep
        "gradient_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "step_s": statistics.median(steps),
        **{f"{k}_s": statistics.median(p[k] for p in parts) for k in ("sample", "score", "update")},
        "response_tokens": statistics.median(tokens),
        "peak_above_models_bytes": max(0, tensor_peak),
        "rss_peak_above_models_bytes": rss_peak,
        "vocab": trainer.student.config.vocab_size,
        "student_parameters": sum(p.numel() for p in trainer.student.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in trainer.student.parameters()),
        "moved_share": moved / max(total, 1),
        "steps_taken": trainer.step,
    }


def render_table(rows: list[dict]) -> str:
    lines = [
        "| model | student params | V | objective | path | grad. checkpointing | step (s) | sample | score | "
        "update | response tokens | tensor peak above models (MiB) | RSS peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ckpt = "yes" if r["checkpointing"] else "no"
        if "error" in r:
            lines.append(
                f"| {r['model']} | | | {r['objective']} | {r['path']} | {ckpt} | error: {r['error'][:80]} | | | | | | |"
            )
        else:
            rss = r.get("rss_peak_above_models_bytes")
            lines.append(
                f"| {r['model']} | {r['student_parameters'] / 1e6:.3g}M | {r['vocab']} | {r['objective']} | "
                f"{r['path']} | {ckpt} | {r['step_s']:.3f} | "
                f"{r['sample_s']:.3f} | "
                f"{r['score_s']:.3f} | {r['update_s']:.3f} | {r['response_tokens']:.0f} | "
                f"{r['peak_above_models_bytes'] / 2**20:.0f} | {'' if rss is None else f'{rss / 2**20:.0f}'} |"
            )
    return "\n".join(lines)


def render_lora_table(rows: list[dict]) -> str:
    lines = [
        "| student | trainable params | AdamW state (MiB) | gradients (MiB) | step peak above models (MiB) | "
        "state + step peak (MiB) | step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = f"LoRA r = {r['lora']}" if r["lora"] else "full fine-tuning"
        if "error" in r:
            lines.append(f"| {what} | error: {r['error'][:80]} | | | | | |")
            continue
        state, peak = r["optimizer_state_bytes"], r["peak_above_models_bytes"]
        lines.append(
            f"| {what} | {r['trainable_parameters'] / 1e6:.3g}M of {r['student_parameters'] / 1e6:.3g}M | "
            f"{state / 2**20:.0f} | {r['gradient_bytes'] / 2**20:.0f} | {peak / 2**20:.0f} | "
            f"{(state + peak) / 2**20:.0f} | {r['step_s']:.2f} |"
        )
    return "\n".join(lines)


def render_precision_table(rows: list[dict]) -> str:
    lines = [
        "| student weights | weights (MiB) | AdamW state incl. masters (MiB) | gradients (MiB) | step peak above "
        "models (MiB) | weights + state + step peak (MiB) | step (s) | trained weights moved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = {"float32": "float32", "bfloat16": "bf16 in place" if r["in_place"] else "bf16 + float32 masters"}[
            r["dtype"]
        ]
        if "error" in r:
            lines.append(f"| {what} | error: {r['error'][:80]} | | | | | | |")
            continue
        weights, state, peak = r["weight_bytes"], r["optimizer_state_bytes"], r["peak_above_models_bytes"]
        lines.append(
            f"| {what} | {weights / 2**20:.0f} | {state / 2**20:.0f} | {r['gradient_bytes'] / 2**20:.0f} | "
            f"{peak / 2**20:.0f} | {(weights + state + peak) / 2**20:.0f} | {r['step_s']:.2f} | "
            f"{100 * r['moved_share']:.1f} % after {r['steps_taken']} steps |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="demo models only, one step")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--objective", default="sampled", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--in-place", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--precision",
        action="store_true",
        help="only llama-100m at lr 1e-5: float32, bf16 in place, bf16 with float32 master weights",
    )
    parser.add_argument(
        "--lora-memory", action="store_true", help="only llama-100m: full fine-tuning against a LoRA (r = 16) student"
    )
    parser.add_argument("--objectives", nargs="+", default=["sampled", "full_vocab"], choices=["sampled", "full_vocab"])
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    steps = 1 if args.quick else args.steps
    rows = []
    runs = [
        (m, o, p, False)
        for m in (["demo"] if args.quick else ["demo", "random-152k"])
        for o in args.objectives
        for p in ("fused", "reference")
    ]
    runs = [(*run, 0, "float32", False) for run in runs]
    if not args.quick:  # a real-sized student: memory of one step with and without gradient checkpointing
        runs += [
            ("llama-100m", "full_vocab", "fused", checkpointing, 0, "float32", False) for checkpointing in (False, True)
        ]
    if args.lora_memory:  # what a LoRA student saves against full fine-tuning, on the 100M model
        runs = [("llama-100m", "full_vocab", "fused", False, rank, "float32", False) for rank in (0, 16)]
    if args.precision:  # what float32 master weights cost against bf16 in place and float32
        runs = [
            ("llama-100m", "full_vocab", "fused", False, 0, dtype, in_place)
            for dtype, in_place in (("float32", False), ("bfloat16", True), ("bfloat16", False))
        ]
    for model, objective, path, checkpointing, lora, dtype, in_place in runs:
        cmd = (
            [
                sys.executable,
                __file__,
                "--worker",
                "--model",
                model,
                "--path",
                path,
                "--steps",
                str(steps),
                "--device",
                args.device,
                "--objective",
                objective,
                "--lora",
                str(lora),
                "--dtype",
                dtype,
            ]
            + (["--checkpointing"] if checkpointing else [])
            + (["--in-place"] if in_place else [])
        )
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        )
        row = {
            "model": model, "objective": objective, "path": path, "checkpointing": checkpointing, "lora": lora,
            "dtype": dtype, "in_place": in_place,
        }  # fmt: skip
        if proc.returncode:
            rows.append({**row, "error": proc.stderr.strip().splitlines()[-1][:200]})
        else:
            rows.append({**row, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    table = (
        render_precision_table(rows)
        if args.precision
        else render_lora_table(rows)
        if args.lora_memory
        else render_table(rows)
    )
    print(table)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        import torch
        from _results import device_label, write_results

        name, title = (
            ("precision", "bf16 students: float32 master weights against bf16 in place and float32")
            if args.precision
            else ("lora-memory", "LoRA against full fine-tuning")
            if args.lora_memory
            else ("train", "Trainer step benchmark")
        )
        write_results(out, name, title, rows, table, device_label(torch.cuda.is_available()))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
