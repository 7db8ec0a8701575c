"""Data-parallel training under torchrun (gloo on the CPU): 1 and 2 processes give the same
rollouts, FiRe statistics and parameters (up to floating-point reduction order)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from fire_opd.demo.tasks import sample_problems
from fire_opd.train.data import write_prompts

ASSETS = Path(__file__).resolve().parents[1] / "fire_opd" / "demo" / "assets"


def _run(tmp_path: Path, out: str, processes: int, *extra: str) -> subprocess.CompletedProcess:
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
    return subprocess.run(
        [*launcher, "train", "--config", str(tmp_path / "cfg.yaml"), "--output-dir", str(tmp_path / out), *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _config(tmp_path: Path, **overrides) -> None:
    write_prompts(sample_problems(["arith", "reverse"], 48, seed=0, split="train"), tmp_path / "p.jsonl")
    config = {
        "student": str(ASSETS / "student_init"),
        "teachers": {"arith": str(ASSETS / "teacher_arith"), "reverse": str(ASSETS / "teacher_reverse")},
        "tokenizer": str(ASSETS / "tokenizer"),
        "prompts": "p.jsonl",
        "steps": 3,
        "prompts_per_step": 8,
        "rollout_chunk_prompts": 2,
        "samples_per_prompt": 2,
        "micro_batch_size": 3,
        "max_new_tokens": 8,
        "warmup_steps": 1,
        "lr": 1e-3,
        "eval_every": 0,
        "progress": False,
        "tensorboard": False,
        "threads": 1,
        "seed": 4,
        "percentile": 25.0,
        **overrides,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))


def _rows(run: Path) -> list[dict]:
    """The training steps' metrics rows (the initial evaluation's row, step 0, left out)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["train/step"]]


def _initial_eval(run: Path) -> dict:
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/step"] == 0
    return first


# fire.filter_mode "verified": each process has the teachers finish its own flagged rollouts
VERIFIED = {"method": "filter_only", "filter_mode": "verified", "percentile": 60.0, "divergence_prob": 0.9}
# the released code's statistics inside each micro-batch, one rollout each (its scripts' setting):
# the same micro-batches whatever the process count, so the same model
PER_ROLLOUT = {"stats_scope": "micro_batch", "micro_batch_size": 1}
# a token quantile over every process's tokens, and a per-sequence normalizer summed over processes
HARD_TOKEN_SEQ_MEAN = {"method": "hard_token", "loss_agg_mode": "seq-mean-token-mean"}
# a quantile per prompt: each prompt's rollouts sit on one process
GROUP_FILTER_SEQ_SUM = {"filter_scope": "group", "loss_agg_mode": "seq-mean-token-sum"}
# truncation, the confidence gate, the trust ratio and the JSD: per-token rules on global maxima
TRUNCATE_GATE_JSD = {
    "filter_mode": "truncate", "teacher_confidence_gate": 0.1, "trust_ratio": True, "divergence": "jsd",
}  # fmt: skip


def _skip_without_fsdp_on_cpu(*modes: str) -> None:
    """FSDP2 over gloo averages the gradients from torch 2.9 on; fire-opd refuses it before
    (`fsdp_refusal`, tested in test_cli.py), so there is nothing to compare."""
    from fire_opd.parallel.distributed import fsdp_refusal

    if "fsdp" in modes and (refusal := fsdp_refusal("cpu")) is not None:
        pytest.skip(refusal)


@pytest.mark.parametrize(
    "objective,parallel,teacher_parallel,chunk_prompts,fire",
    [
        ("full_vocab", "ddp", "replicate", 0, {}),  # the default: each process samples its share in one call
        ("sampled", "ddp", "replicate", 2, {}),
        ("full_vocab", "fsdp", "replicate", 2, {}),
        ("full_vocab", "fsdp", "fsdp", 2, {}),
        ("full_vocab", "ddp", "replicate", 2, VERIFIED),
        ("sampled", "ddp", "replicate", 2, PER_ROLLOUT),
        ("full_vocab", "ddp", "replicate", 2, HARD_TOKEN_SEQ_MEAN),
        ("sampled", "ddp", "replicate", 2, GROUP_FILTER_SEQ_SUM),
        ("full_vocab", "ddp", "replicate", 2, TRUNCATE_GATE_JSD),
    ],
    ids=[
        "ddp",
        "ddp-sampled",
        "fsdp",
        "fsdp-teachers-too",
        "ddp-verified",
        "ddp-micro-batch-statistics",
        "ddp-hard-token-seq-mean",
        "ddp-group-filter-seq-sum",
        "ddp-truncate-gate-jsd",
    ],
)
def test_one_and_two_processes_train_the_same_model(
    tmp_path, objective, parallel, teacher_parallel, chunk_prompts, fire
):
    """DDP and FSDP2 (each process holds half the student, and with teacher_parallel: fsdp half of
    each teacher) match one process, and so do the selection rules whose statistics span the
    processes (the constants above say what each case adds): the metrics logged, the loss, the
    gradient norm and the weights. The FSDP run's checkpoint is a whole Hugging Face folder."""
    _skip_without_fsdp_on_cpu(parallel, teacher_parallel)
    _config(
        tmp_path, objective=objective, parallel=parallel, teacher_parallel=teacher_parallel,
        rollout_chunk_prompts=chunk_prompts, **fire,
    )  # fmt: skip
    one, two = _run(tmp_path, "one", 1), _run(tmp_path, "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    rows_one, rows_two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["train/world_size"] for r in rows_one] == [1.0] * 3
    assert [r["train/world_size"] for r in rows_two] == [2.0] * 3  # rank 0 alone writes the log
    for a, b in zip(rows_one, rows_two):
        for key in (
            "fire/keep_ratio",
            "fire/threshold",
            "fire/weight_mean",
            "train/response_length",
            "train/reward",
            "train/tokens",
            *(("fire/verified_rollouts", "fire/verified_reliable", "fire/verify_tokens") if fire == VERIFIED else ()),
        ):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key  # same rollouts and statistics
        diagnostics = sorted(key for key in a if key.startswith("diag/"))  # what the filter dropped, pooled
        assert diagnostics == sorted(key for key in b if key.startswith("diag/"))
        for key in diagnostics:  # null where neither run kept (or dropped) a rollout of that kind
            assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        for key in ("train/loss", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    if fire == VERIFIED:
        assert sum(r["fire/verified_rollouts"] for r in rows_one) > 0  # the teachers did continue rollouts
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name in a:
        assert float((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12)) < 1e-5, name
    assert all(r["train/comm_bytes"] == 0 for r in rows_one)
    gradient_bytes = 4 * sum(t.numel() for t in a.values())
    if parallel == "ddp":  # DDP all-reduced every fp32 gradient once per step, plus O(rollouts) statistics
        assert all(gradient_bytes <= r["train/comm_bytes"] < gradient_bytes + 10_000 for r in rows_two)
    else:  # FSDP2 all-gathered every parameter at least once and reduce-scattered every gradient
        assert all(r["train/comm_bytes"] >= 2 * gradient_bytes for r in rows_two)
    held = rows_two[0]["train/student_params_per_process"] / rows_one[0]["train/student_params_per_process"]
    assert held == pytest.approx(0.5 if parallel == "fsdp" else 1.0, abs=0.01)  # FSDP2 shards, DDP replicates
    held = rows_two[0]["train/teacher_params_per_process"] / rows_one[0]["train/teacher_params_per_process"]
    assert held == pytest.approx(0.5 if teacher_parallel == "fsdp" else 1.0, abs=0.01)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / "final"))  # whole, loadable by one process
    assert json.loads((tmp_path / "two" / "final" / "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("objective", ["full_vocab", "sampled"])
def test_vocab_parallel_lm_heads_train_the_same_model(tmp_path, objective):
    """vocab_parallel: each of 2 processes holds 9 of the 18 rows of the student's and both
    teachers' lm_heads (and of the student's head gradient and AdamW state); generation,
    scoring and the update run over both processes' tokens and match one process; the
    checkpoint holds the whole head, and a preempted run resumes on 1 process."""
    write_prompts(sample_problems(["arith", "reverse"], 8, seed=1, split="test"), tmp_path / "eval.jsonl")
    # a constant learning rate, so that the 2-step run's schedule is the 4-step run's
    _config(
        tmp_path,
        objective=objective,
        vocab_parallel=True,
        steps=4,
        save_every=2,
        eval_every=2,
        eval_size=8,
        eval_prompts="eval.jsonl",
        warmup_steps=0,
        min_lr_ratio=1.0,
    )
    one, two = _run(tmp_path, "one", 1), _run(tmp_path, "two", 2, "--set", "steps=2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    rows_one, rows_two = _rows(tmp_path / "one")[:2], _rows(tmp_path / "two")
    for a, b in zip(rows_one, rows_two):
        for key in (
            "fire/keep_ratio",
            "fire/threshold",
            "fire/weight_mean",
            "train/response_length",
            "train/reward",
            "train/tokens",
            "train/full_vocab_reverse_kl",
        ):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key  # same rollouts and statistics
        diagnostics = sorted(key for key in a if key.startswith("diag/"))  # what the filter dropped, pooled
        assert diagnostics == sorted(key for key in b if key.startswith("diag/"))
        for key in diagnostics:  # null where neither run kept (or dropped) a rollout of that kind
            assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        for key in ("train/loss", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert rows_one[1]["eval/accuracy"] == rows_two[1]["eval/accuracy"]  # generation with sharded heads
    assert _initial_eval(tmp_path / "one") == _initial_eval(tmp_path / "two")  # before step 1, too
    head = 18 * 96  # the demo models' lm_head
    for key in ("train/student_params_per_process", "train/teacher_params_per_process"):
        models = 1 if "student" in key else 2
        assert rows_one[0][key] - rows_two[0][key] == models * head // 2, key  # half of each lm_head
    # resume the 2-process run's step-2 checkpoint on 1 process: it ends where the 1-process run does
    resumed = _run(tmp_path, "two", 1, "--set", "resume_from=latest", "--set", "checkpoint.allow_config_change=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert b["lm_head.weight"].shape == (18, 96)
    for name in a:
        assert float((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12)) < 1e-4, name


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_resumed_run_may_change_the_process_count(tmp_path, parallel):
    """Rollouts depend on (seed, step, prompt, sample) only: a 2-process run preempted with SIGTERM
    (torchrun forwards it; every rank stops at the same step boundary with one checkpoint) and
    resumed by one process ends where a 1-process run does, and the log says the count changed.
    Four steps: the processes' reduction order moves AdamW's weights by ~1e-6 per step, and over
    more steps that flips a sampled token now and then, after which the runs go apart."""
    _skip_without_fsdp_on_cpu(parallel)
    import signal
    import time

    _config(tmp_path, steps=4, save_every=2, objective="full_vocab", parallel=parallel)
    whole = _run(tmp_path, "whole", 1)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fire_opd",
        "train",
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--output-dir",
        str(tmp_path / "mixed"),
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "mixed" / "step-000002").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert "stopped after step" in err, err[-3000:]
    assert not (tmp_path / "mixed" / "final").exists()
    resumed = _run(tmp_path, "mixed", 1, "--set", "resume_from=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "written by 2 process(es), resuming with 1" in resumed.stderr
    worlds = [r["train/world_size"] for r in _rows(tmp_path / "mixed")]
    assert len(worlds) == 4 and worlds[0] == 2.0 and worlds[-1] == 1.0
    assert [r["train/step"] for r in _rows(tmp_path / "mixed")] == list(range(1, 5))
    for a, b in zip(_rows(tmp_path / "whole"), _rows(tmp_path / "mixed")):
        assert (a["train/response_length"], a["train/reward"]) == (b["train/response_length"], b["train/reward"])
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "mixed" / "final" / "model.safetensors"))
    for name in a:
        assert float((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12)) < 1e-4, name


def test_one_rank_failing_mid_run_ends_the_job_with_its_error(tmp_path):
    """Rank 1 raises during step 2 (from a verifier, so nothing in the trainer knows): torchrun
    ends the whole job, rank 0 is not left waiting in a collective, and the error is printed."""
    (tmp_path / "flaky_verifier.py").write_text(
        "import os\n"
        "calls = 0\n"
        "def score(completion, answer, row):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if os.environ.get('RANK') == '1' and calls > 8:\n"
        "        raise MemoryError('rank 1 ran out of memory (simulated)')\n"
        "    return float(completion.strip() == answer)\n"
    )
    _config(tmp_path, steps=50, verifier="flaky_verifier:score")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fire_opd",
        "train",
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--output-dir",
        str(tmp_path / "flaky"),
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    assert "rank 1 ran out of memory (simulated)" in out.stderr
    assert not (tmp_path / "flaky" / "final").exists()


def test_chunks_that_cannot_be_dealt_and_failing_ranks_end_the_job(tmp_path):
    for overrides in ({"rollout_chunk_prompts": 8}, {"rollout_chunk_prompts": 0, "prompts_per_step": 7}):
        _config(tmp_path, **overrides)  # one chunk, or 7 prompts, for two processes: refused before models load
        out = _run(tmp_path, "bad", 2)
        assert out.returncode != 0 and "cannot be dealt evenly to 2 processes" in out.stderr, out.stderr[-2000:]
        assert "fire_opd/" not in out.stderr  # each rank's one line; the traceback is torchrun's own
    _config(tmp_path, prompts="missing.jsonl")  # every rank fails its checks: the job ends, no hang
    out = _run(tmp_path, "missing", 2)
    assert out.returncode != 0 and "prompts missing.jsonl: no such file" in out.stderr
