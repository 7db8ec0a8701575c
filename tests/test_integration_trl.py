"""FiRe-OPD inside TRL 1.16's DistillationTrainer, on the shipped tiny models (CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")  # installed by `make test` (the test extra); never skipped in CI

from datasets import Dataset  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402

from fire_opd.algorithm.objectives import fire_dense_loss, fire_policy_loss  # noqa: E402
from fire_opd.algorithm.options import FireOptions
from fire_opd.demo.tasks import sample_problems  # noqa: E402
from fire_opd.integrations.trl import FireOPDConfig, FireOPDDistillationTrainer  # noqa: E402
from fire_opd.train.models import load_causal_lm, load_tokenizer  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "fire_opd" / "demo" / "assets"
COMMON = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    max_completion_length=6,
    learning_rate=1e-3,
    report_to=[],
    use_cpu=True,
    bf16=False,
    fp16=False,
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=0,
    top_k=0,
    temperature=1.0,
)


@pytest.fixture(autouse=True)
def _no_inherited_mixed_precision(monkeypatch):
    """Each test's trainers see the precision its own arguments name. transformers 4.x's
    TrainingArguments writes it into the process's environment (ACCELERATE_MIXED_PRECISION), where
    every later Accelerator reads it: after a `bf16=True` test, a `bf16=False` trainer's teacher ran
    under bf16 autocast, and the oracle test met bf16 teacher statistics in `make test-oldest
    --peers`. Set to accelerate's default here, it is restored when the test ends."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")


def _trainer(tmp_path, cls=FireOPDDistillationTrainer, config_cls=FireOPDConfig, padded_rows=None, **fields):
    """The shipped student and arithmetic teacher in TRL (`padded_rows`: both heads padded to it)."""
    tokenizer = load_tokenizer(ASSETS / "tokenizer")
    dataset = Dataset.from_list([{"prompt": p.prompt} for p in sample_problems(["arith"], 32, seed=0, split="train")])
    args = config_cls(output_dir=str(tmp_path / "out"), **{**COMMON, **fields})
    student, teacher = load_causal_lm(ASSETS / "student_init"), load_causal_lm(ASSETS / "teacher_arith")
    if padded_rows is not None:
        student, teacher = _padded(student, padded_rows), _padded(teacher, padded_rows)
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer)


def _batch(trainer, rows: int = 6, seed: int = 0) -> dict:
    """A generation batch as TRL builds it: left-padded prompts, right-padded completions."""
    gen = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (rows, 5), generator=gen)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = trainer.processing_class.pad_token_id
    completion_ids = torch.randint(3, vocab, (rows, 7), generator=gen)
    completion_mask = torch.ones_like(completion_ids)
    for r, length in enumerate([7, 3, 5, 7, 1, 6][:rows]):
        completion_mask[r, length:] = 0
        completion_ids[r, length:] = trainer.processing_class.pad_token_id
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum(),
    }


def _materialized(model, batch, temperature=1.0):
    """[B, T, V] log-softmax of the model's own logits over the completion positions."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -batch["completion_ids"].shape[1] - 1 : -1]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def test_two_training_steps_log_fire_metrics(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, fire_percentile=25.0)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = {k for row in trainer.state.log_history for k in row}
    assert {
        "fire/keep_ratio",
        "fire/weight_mean",
        "fire/full_vocab_reverse_kl",
        "fire/divergence",
        "loss",
        "entropy",
    } <= logged
    keep = [row["fire/keep_ratio"] for row in trainer.state.log_history if "fire/keep_ratio" in row]
    assert keep and all(0.6 <= k <= 0.8 for k in keep)  # 25 % of 8 rollouts dropped per generation batch
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("objective", ["full_vocab", "sampled"])
def test_bf16_mixed_precision_steps_train_every_parameter(tmp_path, monkeypatch, objective):
    """Two real steps with `bf16=True` on the CPU: every parameter moves. Under transformers 4.x
    TRL's Trainer computes the loss inside CPU autocast (`use_cpu_amp`), where the kernels then get
    bf16 operands; transformers 5 does not autocast the loss, and they get the model's float32.
    (The `make test-oldest --peers` run is the one that meets the first case.)"""
    import importlib

    token_stats = importlib.import_module("fire_kernels.token_stats")
    seen: set[torch.dtype] = set()
    validate = token_stats.validate_stats_inputs

    def watched(hidden, *args, **kwargs):
        seen.add(hidden.dtype)
        return validate(hidden, *args, **kwargs)

    monkeypatch.setattr(token_stats, "validate_stats_inputs", watched)
    trainer = _trainer(tmp_path, max_steps=2, bf16=True, fire_objective=objective)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert [name for name, p in trainer.model.named_parameters() if torch.equal(before[name], p)] == []
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses and all(math.isfinite(x) for x in losses)
    autocast_loss = bool(getattr(trainer, "use_cpu_amp", False))
    assert (torch.bfloat16 in seen) == autocast_loss and torch.float32 in seen  # the statistics: float32


# One process of a torchrun job (accelerate's MULTI_CPU over gloo): two steps, then its weights and
# logged metrics to files named by rank.
_RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_integration_trl import _trainer
out = Path(sys.argv[1])
trainer = _trainer(out, max_steps=2, fire_percentile=25.0)
trainer.train()
rank = os.environ["RANK"]
torch.save(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]), out / f"weights{{rank}}.pt")
(out / f"log{{rank}}.json").write_text(json.dumps(trainer.state.log_history))
"""


def test_two_processes_select_over_both_and_end_with_the_same_weights(tmp_path):
    """Under torchrun the FiRe statistics span both processes' rollouts (each process generates
    4 x 2 rollouts of 6 tokens per step: 96 response tokens between them, 25 % of the 16 dropped),
    the metrics of each process's own rows are logged over both, no collective is left waiting,
    and DDP leaves both processes with the same weights."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*launch, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "weights0.pt"), torch.load(tmp_path / "weights1.pt"))
    rows = [row for row in json.loads((tmp_path / "log0.json").read_text()) if "fire/keep_ratio" in row]
    assert len(rows) == 2
    assert all(row["fire/response_tokens"] == 96 and row["fire/keep_ratio"] == 0.75 for row in rows)
    # the metrics of each process's own rows are logged as the mean over both, the same on each
    other = [row for row in json.loads((tmp_path / "log1.json").read_text()) if "fire/keep_ratio" in row]
    for mine, theirs in zip(rows, other):
        for key in ("fire/full_vocab_reverse_kl", "fire/divergence", "fire/dense_loss", "fire/keep_ratio"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-12), key


@pytest.mark.parametrize("objective", ["full_vocab", "sampled"])
def test_loss_on_a_fixed_batch_equals_the_materialized_oracle(tmp_path, objective):
    trainer = _trainer(
        tmp_path,
        fire_objective=objective,
        fire_percentile=30.0,
        fire_alpha=0.7,
        fire_beta=1.3,
        fire_loss_agg_mode="seq-mean-token-mean",
        fire_backend="chunked",
        temperature=0.9,
        beta=0.5,
    )
    trainer.model.train()  # a training batch: evaluation would not filter (fire_filter_eval)
    batch = _batch(trainer)
    batch.update(trainer._fire_statistics(batch))
    student, teacher = trainer.model, trainer.teacher_model
    loss, _, _ = trainer._compute_loss(student, batch, batch["num_items_in_batch"])
    grads = torch.autograd.grad(loss, list(student.parameters()))

    mask = batch["completion_mask"].bool()
    log_s = _materialized(student, batch, 0.9)
    with torch.no_grad():
        log_t = _materialized(teacher, batch, 0.9)
    ids = batch["completion_ids"].unsqueeze(-1)
    log_prob = log_s.gather(-1, ids).squeeze(-1)
    teacher_log_prob = log_t.gather(-1, ids).squeeze(-1)
    entropy = lambda lp: -(lp.exp() * lp).sum(-1)  # noqa: E731
    kwargs = dict(fire=FireOptions(percentile=30.0, alpha=0.7, beta=1.3), loss_agg_mode="seq-mean-token-mean")
    stats = (log_prob.detach(), teacher_log_prob, entropy(log_s).detach(), entropy(log_t), mask)
    if objective == "full_vocab":  # beta = 0.5: the symmetric JSD
        mixture = torch.logsumexp(
            torch.stack([log_s + torch.log(torch.tensor(0.5)), log_t + torch.log(torch.tensor(0.5))]), dim=0
        )
        jsd = 0.5 * (log_s.exp() * (log_s - mixture)).sum(-1) + 0.5 * (log_t.exp() * (log_t - mixture)).sum(-1)
        expected, _ = fire_dense_loss(jsd, *stats, **kwargs)
    else:
        expected, _ = fire_policy_loss(log_prob, *stats, clip_ratio=0.2, **kwargs)
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()) + 1e-8)
    dropped = ~batch["fire_loss_mask"].any(dim=1) & mask.any(dim=1)
    assert int(dropped.sum()) == 2  # below the 30th percentile of 6 scores (between the 2nd and 3rd): two dropped


@pytest.mark.parametrize("objective", ["full_vocab", "sampled"])
def test_the_loss_runs_inside_bf16_autocast(tmp_path, objective):
    """Under transformers 4.x TRL's Trainer computes the loss inside bf16 autocast on the CPU
    (`bf16=True` there; transformers 5 does not, so `make test` never meets it in a real run;
    `make test-oldest --peers` does). The loss and its gradients there are finite and within bf16's
    rounding of the float32 ones (before 2ab5c12 the dense objective raised inside the fused
    update). The statistics come first, outside autocast, as TRL's `_prepare_inputs` computes them
    before `compute_loss`'s autocast region: a no-grad forward inside the loss's region would, on
    torch 2.6 (not 2.13), leave the loss forward autocast's cached gradient-less weight casts and
    the decoder's linear layers without gradients."""
    trainer = _trainer(tmp_path, fire_objective=objective, fire_percentile=30.0)
    trainer.model.train()
    batch = _batch(trainer)
    with_stats = {**batch, **trainer._fire_statistics(batch)}

    def loss_and_grads():
        loss, _, _ = trainer._compute_loss(trainer.model, with_stats, batch["num_items_in_batch"])
        return loss, torch.autograd.grad(loss, list(trainer.model.parameters()))

    expected, expected_grads = loss_and_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads()
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=5e-2, atol=1e-3)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == e.dtype and bool(torch.isfinite(g).all())
        assert float((g - e).norm()) <= 0.1 * float(e.norm()) + 1e-6


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_opd_method_equals_trls_own_loss(tmp_path, beta):
    """fire_method="opd" (no filter, weight 1) on a fixed batch is TRL's own DistillationTrainer
    loss: same value, same gradients, at every JSD beta."""
    ours = _trainer(tmp_path / "ours", fire_method="opd", beta=beta, fire_backend="chunked")
    theirs = _trainer(tmp_path / "theirs", cls=DistillationTrainer, config_cls=DistillationConfig, beta=beta)
    batch = _batch(ours, seed=1)
    with_stats = {**batch, **ours._fire_statistics(batch)}
    loss, entropy_sum, tokens = ours._compute_loss(ours.model, with_stats, batch["num_items_in_batch"])
    expected, expected_entropy, expected_tokens = theirs._compute_loss(theirs.model, batch, batch["num_items_in_batch"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(entropy_sum, expected_entropy.to(entropy_sum.dtype), rtol=1e-5, atol=1e-5)
    assert int(tokens) == int(expected_tokens)
    for g, e in zip(
        torch.autograd.grad(loss, list(ours.model.parameters())),
        torch.autograd.grad(expected, list(theirs.model.parameters())),
    ):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()) + 1e-8)


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_opd_method_inside_bf16_autocast_equals_trls_own_loss_there(tmp_path, beta):
    """Inside bf16 autocast (TRL's Trainer's loss under transformers 4.x on the CPU) our kernels
    cast to bf16 for their products as TRL's logits are, so fire_method="opd" is still TRL's loss:
    the loss equal, the gradients within the rounding of bf16 logit gradients (0.5-0.6% measured)
    and nearer to TRL's than to our own float32 ones (1.5-5% away). Before c1e8593 our loss there
    was the float32 one, 1e-2 from TRL's. The statistics come first, outside autocast, as in
    `test_the_loss_runs_inside_bf16_autocast`."""
    ours = _trainer(tmp_path / "ours", fire_method="opd", beta=beta, fire_backend="chunked")
    theirs = _trainer(tmp_path / "theirs", cls=DistillationTrainer, config_cls=DistillationConfig, beta=beta)
    batch = _batch(ours, seed=1)
    with_stats = {**batch, **ours._fire_statistics(batch)}

    def loss_and_grads(trainer, inputs, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = trainer._compute_loss(trainer.model, inputs, inputs["num_items_in_batch"])[0]
            return loss, torch.autograd.grad(loss, list(trainer.model.parameters()))

    def distance(a, b) -> float:
        difference = torch.cat([(x - y).flatten() for x, y in zip(a, b)])
        return float(difference.norm() / torch.cat([y.flatten() for y in b]).norm())

    loss, grads = loss_and_grads(ours, with_stats, True)
    expected, expected_grads = loss_and_grads(theirs, batch, True)
    _, float32_grads = loss_and_grads(ours, with_stats, False)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert distance(grads, expected_grads) <= 0.02
    assert distance(grads, expected_grads) < distance(grads, float32_grads)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("fire_method", "nope", "fire_method must be one of"),
        ("fire_percentile", 120.0, r"fire_percentile must be in \[0, 100\]"),
        ("fire_percentile", "20", r"fire_percentile must be a finite number in \[0, 100\], got '20'"),
        ("fire_alpha", -1.0, r"fire_alpha must be in \[0, inf\]"),
        ("fire_beta", -2.0, r"fire_beta must be in \[0, inf\]"),  # named as written: not TRL's beta
        ("fire_clip_ratio", -0.2, r"fire_clip_ratio must be a number in \[0, 1\)"),
        ("fire_filter_score", "median", "fire_filter_score must be one of"),
        ("fire_teacher_confidence_gate", 1.5, r"fire_teacher_confidence_gate must be in \[0, 1\]"),
        ("fire_objective", "dense", "fire_objective must be one of"),
    ],
)
def test_config_checks_every_fire_field_when_constructed(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        FireOPDConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})


def test_config_needs_a_fire_config(tmp_path):
    with pytest.raises(TypeError, match="args must be a FireOPDConfig"):
        _trainer(tmp_path, config_cls=DistillationConfig)


def test_peft_lora_student_trains(tmp_path):
    """A LoRA student (TRL's own `peft_config` path): our statistics and loss reach the adapter
    through the PEFT wrapper; the head is read from the base model; only adapters move."""
    from peft import LoraConfig

    tokenizer = load_tokenizer(ASSETS / "tokenizer")
    dataset = Dataset.from_list([{"prompt": p.prompt} for p in sample_problems(["arith"], 16, seed=0, split="train")])
    args = FireOPDConfig(output_dir=str(tmp_path / "out"), max_steps=2, **{**COMMON, "learning_rate": 1e-2})
    trainer = FireOPDDistillationTrainer(
        model=load_causal_lm(ASSETS / "student_init"),
        teacher_model=load_causal_lm(ASSETS / "teacher_arith"),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lm_head" in n}
    assert adapters and frozen
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(v, params[n]) for n, v in adapters.items())
    assert all(torch.equal(v, params[n]) for n, v in frozen.items())
    assert any("fire/keep_ratio" in row for row in trainer.state.log_history)


@pytest.mark.parametrize("filter_eval", [False, True])
def test_evaluation_filters_only_when_asked(tmp_path, filter_eval):
    """In evaluation every completion keeps weight 1 (eval_loss is plain TRL's) unless
    fire_filter_eval; training filters either way."""
    trainer = _trainer(tmp_path, fire_percentile=40.0, fire_filter_eval=filter_eval, fire_backend="chunked")
    batch = _batch(trainer)
    mask = trainer._loss_mask(batch)
    trainer.model.eval()
    evaluated = trainer._fire_statistics(batch)
    trainer.model.train()
    trained = trainer._fire_statistics(batch)
    assert int(trained["fire_loss_mask"].sum()) < int(mask.sum())  # training drops rollouts
    if filter_eval:
        assert torch.equal(evaluated["fire_loss_mask"], trained["fire_loss_mask"])
    else:
        assert torch.equal(evaluated["fire_loss_mask"], mask.bool())
        assert float(trainer._metrics["eval"]["fire/keep_ratio"][-1]) == 1.0


def test_the_documented_example_runs_from_any_directory(tmp_path):
    """docs/trl.md's script, as written, in a folder outside the repository: the shipped models are
    found through `fire_opd.demo.asset` wherever the package is installed."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "trl.md").read_text()
    script = re.search(r"```python\n(.*?)```", page, flags=re.S).group(1)
    (tmp_path / "example.py").write_text(script)
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs" / "trl-fire").is_dir()


def _padded(model, rows: int):
    """The model with its embedding and lm_head padded to `rows` (Qwen-style), the padded head
    rows copies of the most likely token's row, scaled up: unsuppressed, they would be sampled."""
    vocab = model.config.vocab_size
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[vocab:] = head[:vocab].mean(0, keepdim=True) * 0 + head[3] * 4
    return model


def test_padded_heads_train_and_never_sample_a_padded_id(tmp_path):
    """Heads padded past the tokenizer (24 rows, 18 tokens): TRL's generation never samples a
    padded id, the loss runs over the tokenizer's vocabulary, and two steps train."""
    trainer = _trainer(tmp_path, padded_rows=24, max_steps=2)
    assert trainer.fire_vocab_size == len(trainer.processing_class) == 18
    sampled = []
    real = FireOPDDistillationTrainer._fire_statistics

    def spy(self, batch):
        sampled.append(batch["completion_ids"][batch["completion_mask"].bool()])
        return real(self, batch)

    trainer._fire_statistics = spy.__get__(trainer)
    trainer.train()
    assert sampled and all(int(ids.max()) < 18 for ids in sampled if ids.numel())
    logged = [row["fire/padded_id_tokens"] for row in trainer.state.log_history if "fire/padded_id_tokens" in row]
    assert logged and all(v == 0.0 for v in logged)


def test_a_completion_is_cut_before_a_padded_id(tmp_path):
    """A generator that ignores suppress_tokens (vLLM): the padded id and what follows leave the
    loss and become padding."""
    trainer = _trainer(tmp_path)
    trainer.fire_vocab_size = 15  # as if rows 15..17 were padding
    batch = _batch(trainer, seed=3)
    batch["completion_ids"][1, :3] = torch.tensor([4, 16, 5])  # row 1 keeps 3 tokens: the 2nd is padded
    batch["completion_ids"][2, :] = torch.clamp(batch["completion_ids"][2, :], max=14)
    batch["completion_mask"][2, :] = 1
    trainer._cut_at_padded_ids(batch)
    assert batch["completion_mask"][1].tolist()[:3] == [1, 0, 0]
    assert int(batch["completion_ids"][batch["completion_mask"].bool()].max()) < 15
    assert batch["completion_mask"][2].sum() == 7


def test_the_fire_fields_are_generated_from_fire_options(tmp_path):
    """Every FireOptions field is a fire_<name> field of FireOPDConfig with its default and help
    (declared once, in FireOptions); filter_scope "group" has no groups to rank in TRL."""
    import dataclasses

    declared = {f.name: f for f in dataclasses.fields(FireOPDConfig)}
    for option in dataclasses.fields(FireOptions):
        mine = declared[f"fire_{option.name}"]
        assert mine.default == option.default and mine.metadata["help"] == option.metadata["help"]
    args = FireOPDConfig(output_dir=str(tmp_path), fire_alpha=0.5, fire_filter_score="teacher_sum", **COMMON)
    assert args.fire == FireOptions(alpha=0.5, filter_score="teacher_sum")
    with pytest.raises(ValueError, match="fire_filter_scope must be batch here"):
        FireOPDConfig(output_dir=str(tmp_path), fire_filter_scope="group", **COMMON)
    # the selection rules beyond the paper: truncate and the trust ratio here; verified needs our trainer
    args = FireOPDConfig(
        output_dir=str(tmp_path), fire_filter_mode="truncate", fire_divergence_prob=0.2, fire_trust_ratio=True, **COMMON
    )
    assert args.fire == FireOptions(filter_mode="truncate", divergence_prob=0.2, trust_ratio=True)
    with pytest.raises(ValueError, match="fire_filter_mode 'verified' needs fire-opd's trainer"):
        FireOPDConfig(output_dir=str(tmp_path), fire_filter_mode="verified", **COMMON)
    with pytest.raises(ValueError, match="fire_divergence_prob must be strictly between 0 and 1"):
        FireOPDConfig(output_dir=str(tmp_path), fire_filter_mode="truncate", fire_divergence_prob=1.0, **COMMON)
