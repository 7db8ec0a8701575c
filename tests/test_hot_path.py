"""The shape of one training step (issue 29's restructuring), pinned so that it stays:

- no module's `forward` is ever replaced: the student's and teachers' per-step computations are
  modules (`train/forwards.py`) whose own `forward` returns statistics or the loss, wrapped once
  at setup;
- a float32 student's mixed-precision forwards (bf16 autocast, on CUDA) reach the kernels inside
  autocast, so the heads' products are bf16;
- one default step over two processes calls at most 10 collectives (`trace_step.py
  --collectives`; 22 before the FiRe statistics and the step's metrics were batched), each a
  launch and a wait on NCCL.

Both run the default recipe of `benchmarks/trace_step.py` on tiny models.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRACE_STEP = ROOT / "benchmarks" / "trace_step.py"


def _trace_step():
    spec = importlib.util.spec_from_file_location("trace_step", TRACE_STEP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_step_replaces_no_modules_forward(monkeypatch, tmp_path):
    trainer = _trace_step().default_trainer(str(tmp_path))
    replaced: list[str] = []
    set_attribute = torch.nn.Module.__setattr__

    def watched(module, name, value):
        if name == "forward":
            replaced.append(type(module).__name__)
        set_attribute(module, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", watched)
    try:
        metrics = trainer.train_step()
        modules = [trainer.student_forward, *trainer.teacher_forwards.values()]
        instance_forwards = [
            type(m).__name__ for top in modules for m in top.modules() if "forward" in vars(m)
        ]  # a swap made around __setattr__ (and never undone) shows here
    finally:
        trainer.close()
    assert replaced == [] and instance_forwards == []
    assert metrics["train/tokens"] > 0


def test_a_mixed_precision_step_gives_the_kernels_bf16_operands(monkeypatch, tmp_path):
    """On CUDA a float32 student's forwards run under bf16 autocast (`forwards.autocast`). A
    float32 decoder's final hidden states stay float32 there, so the kernels must be called inside
    the autocast region to cast them and the heads to bf16; called after it, every product of the
    step ran in float32. Here CPU autocast stands in for CUDA's."""
    import importlib
    from contextlib import nullcontext

    from fire_opd.train import forwards

    token_stats = importlib.import_module("fire_kernels.token_stats")  # the module (the package exports a function)

    monkeypatch.setattr(
        forwards,
        "autocast",
        lambda device, dtype: torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "float32" else nullcontext(),
    )
    seen: set[tuple[str, torch.dtype]] = set()
    validate = token_stats.validate_stats_inputs

    def watched(hidden, head, targets, teacher_hidden=None, teacher_head=None, **checks):
        seen.update({("hidden", hidden.dtype), ("head", head.weight.dtype)})
        if teacher_hidden is not None and teacher_head is not None:
            seen.update({("teacher_hidden", teacher_hidden.dtype), ("teacher_head", teacher_head.weight.dtype)})
        return validate(hidden, head, targets, teacher_hidden, teacher_head, **checks)

    monkeypatch.setattr(token_stats, "validate_stats_inputs", watched)
    trainer = _trace_step().default_trainer(str(tmp_path))
    try:
        assert next(trainer.student.parameters()).dtype == torch.float32
        metrics = trainer.train_step()
    finally:
        trainer.close()
    assert seen == {(name, torch.bfloat16) for name in ("hidden", "head", "teacher_hidden", "teacher_head")}
    assert metrics["train/tokens"] > 0 and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_a_two_process_step_calls_at_most_ten_collectives():
    run = subprocess.run(
        [sys.executable, str(TRACE_STEP), "--collectives"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.search(r"collectives one step calls, per process \(2 processes\): (\d+)", run.stdout)
    assert found is not None, run.stdout
    calls = int(found[1])
    assert 0 < calls <= 10, run.stdout


def test_trace_step_measures_each_function_body_without_its_docstring():
    """trace_step's body sizes (how much a reader who opens a traced function reads): the body's
    lines with the docstring left out, found from the code object's first line, which for a
    decorated function is its first decorator's."""
    from fire_kernels.lm_head import LMHead, as_head
    from fire_opd.train.scoring import score_rollouts

    first_lines = {
        "fire_kernels/lm_head.py:as_head": as_head.__code__.co_firstlineno,
        "fire_kernels/lm_head.py:LMHead.to": LMHead.to.__code__.co_firstlineno,
        "fire_opd/train/scoring.py:score_rollouts": score_rollouts.__wrapped__.__code__.co_firstlineno,
    }
    sizes = _trace_step().body_lines(first_lines)
    assert sizes["fire_kernels/lm_head.py:as_head"] == 5  # two ifs with their returns, the raise
    assert sizes["fire_kernels/lm_head.py:LMHead.to"] == 1
    source = inspect.getsource(score_rollouts.__wrapped__).splitlines()  # from its decorator on
    docstring_end = max(i for i, line in enumerate(source) if line.rstrip().endswith('"""'))
    assert (
        source[0].startswith("@")
        and sizes["fire_opd/train/scoring.py:score_rollouts"] == len(source) - docstring_end - 1
    )
