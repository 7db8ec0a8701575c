"""The kernels and the trainer on the test device; the kernels against the float64 oracle.

`FIRE_OPD_TEST_DEVICE=cuda` (what `make gpu-check` sets) runs this file on the GPU: the native
bf16 / fp16 dots, the GPU tile configurations, the `chunked` backend's cuBLAS tiles + Triton
folds, shapes that are not multiples of any tile, N = 0, and int64 offsets at N x V > 2^31; then
a few steps of the trainer as users run it there (bf16 autocast, a bf16 student, bf16 teachers,
LoRA, a resumed run, the verified filter, TRL with padded heads).
Without it the same cases run on the CPU (the kernels in Triton's interpreter at tiny shapes), so
that the GPU check cannot rot; the cases that only mean something on a GPU are marked `cuda` and
reported by conftest in one line as not applicable here.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close_grad, assert_close_output, make_problem
from conftest import TEST_DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st

from fire_kernels import LMHead, teacher_student_stats, token_stats
from fire_kernels.fused_update import linear_divergence_update

DEVICE = torch.device(TEST_DEVICE)
ON_CUDA = DEVICE.type == "cuda"
BACKENDS = ["chunked", "triton", "auto"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DIVERGENCES = [None, "reverse_kl", "forward_kl", "jsd"]
# CUDA: vocabularies past a tile and below, with awkward remainders; the interpreter: tiny ones
VOCABS = [1, 97, 4_099, 32_003] if ON_CUDA else [1, 7, 37, 101]
MAX_N = 1_500 if ON_CUDA else 24
MAX_D = 320 if ON_CUDA else 24


def _grads(backend, s_h, s_w, t_h, t_w, targets, divergence, dtype, s_b=None, t_b=None, softcap=None):
    """Outputs and gradients (hidden, weight, and the bias when there is one) of a fixed random
    combination of the differentiable outputs; with `s_b` / `t_b` / `softcap`, heads beyond h W^T."""
    s_h = s_h.detach().clone().requires_grad_()
    s_w = s_w.detach().clone().requires_grad_()
    s_b = None if s_b is None else s_b.detach().clone().requires_grad_()
    head, teacher_head = LMHead(s_w, s_b, logit_softcap=softcap), LMHead(t_w, t_b, logit_softcap=softcap)
    out = teacher_student_stats(s_h, head, t_h, teacher_head, targets, divergence=divergence, backend=backend)
    gen = torch.Generator().manual_seed(1)
    n = targets.shape[0]
    coeffs = [torch.randn(n, generator=gen).to(DEVICE if backend != "reference" else "cpu") for _ in range(3)]
    loss = (coeffs[0] * out.student_log_prob.float()).sum() + (coeffs[1] * out.student_entropy.float()).sum()
    if divergence is not None:
        loss = loss + (coeffs[2] * out.divergence.float()).sum()
    inputs = (s_h, s_w) + (() if s_b is None else (s_b,))
    return out, torch.autograd.grad(loss, inputs, allow_unused=True)


def _compare_on_device(backend, dtype, divergence, *, n, vocab, d_s, d_t, seed, head_seed=None):
    """Against the float64 oracle on the CPU, from the same rounded inputs; `head_seed` gives both
    models a bias (drawn from it) and Gemma 2's soft-cap of 30."""
    s_h, s_w, t_h, t_w, targets = make_problem(n, vocab, d_s, d_t, dtype, seed=seed)
    heads = {}
    if head_seed is not None:
        gen = torch.Generator().manual_seed(head_seed)
        heads = {"s_b": torch.randn(vocab, generator=gen).to(dtype), "t_b": torch.randn(vocab, generator=gen).to(dtype)}
    ref_heads = {k: v.double() for k, v in heads.items()}
    softcap = 30.0 if heads else None
    ref, ref_grads = _grads(
        "reference",
        *(x.double() if x.is_floating_point() else x for x in (s_h, s_w, t_h, t_w, targets)),
        divergence,
        torch.float64,
        softcap=softcap,
        **ref_heads,
    )
    got, got_grads = _grads(
        backend,
        *(x.to(DEVICE) for x in (s_h, s_w, t_h, t_w, targets)),
        divergence,
        dtype,
        softcap=softcap,
        **{k: v.to(DEVICE) for k, v in heads.items()},
    )
    for field in got._fields:
        if getattr(ref, field) is None:
            assert getattr(got, field) is None, field
            continue
        assert getattr(got, field).device.type == DEVICE.type
        assert_close_output(getattr(got, field).cpu().float(), getattr(ref, field).float(), dtype, f"{backend}/{field}")
    for name, got_grad, ref_grad in zip(("grad_hidden", "grad_weight", "grad_bias"), got_grads, ref_grads):
        assert got_grad.dtype == dtype, name
        assert_close_grad(got_grad.cpu(), ref_grad, dtype, f"{backend}/{name}")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20 if ON_CUDA else 2)  # the CPU suites cover the interpreter in depth
@given(
    n=st.integers(0, MAX_N),
    vocab=st.sampled_from(VOCABS),
    d_s=st.integers(1, MAX_D),
    d_t=st.integers(1, MAX_D),
    seed=st.integers(0, 10_000),
)
def test_statistics_and_gradients_match_the_float64_oracle(backend, dtype, divergence, n, vocab, d_s, d_t, seed):
    if not ON_CUDA and backend == "triton" and dtype == torch.bfloat16 and divergence is not None and n > 12:
        n = 12  # the interpreter's bf16 path is the slowest; the CUDA run covers the sizes
    _compare_on_device(backend, dtype, divergence, n=n, vocab=vocab, d_s=d_s, d_t=d_t, seed=seed)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_biased_soft_capped_heads_match_the_float64_oracle(backend, dtype, divergence):
    """Both models with a bias and a soft-cap: the "+head" kernels, the bias gradient, and in fp32
    under Triton < 3.9 the backward's narrower D tile (csrc_notes/token_stats.md)."""
    n, vocab, d_s, d_t = (600, 4_099, 192, 256) if ON_CUDA else (11, 37, 12, 20)
    _compare_on_device(backend, dtype, divergence, n=n, vocab=vocab, d_s=d_s, d_t=d_t, seed=21, head_seed=22)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_no_tokens(backend):
    s_h, s_w, t_h, t_w, targets = (x.to(DEVICE) for x in make_problem(0, 37, 8, 8, torch.float32))
    s_h.requires_grad_()
    lp, ent = token_stats(s_h, s_w, targets, backend=backend)
    assert lp.shape == ent.shape == (0,) and lp.device.type == DEVICE.type
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), s_h, allow_unused=True)
    assert grad is None or grad.shape == s_h.shape


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_fused_divergence_update_matches_autograd_of_the_oracle(backend, divergence):
    n, vocab, d = (700, 32_003, 128) if ON_CUDA else (19, 37, 16)
    s_h, s_w, t_h, t_w, targets = make_problem(n, vocab, d, d + 8, torch.float32, seed=3)
    coefficient = torch.randn(n, generator=torch.Generator().manual_seed(4))
    got = linear_divergence_update(
        *(x.to(DEVICE) for x in (s_h, s_w, t_h, t_w, targets)),
        coefficient.to(DEVICE),
        divergence=divergence,
        backend=backend,
    )
    h, w = s_h.double().requires_grad_(), s_w.double().requires_grad_()
    ref = teacher_student_stats(h, w, t_h.double(), t_w.double(), targets, divergence=divergence, backend="reference")
    loss = (coefficient.double() * ref.divergence).sum()
    ref_gh, ref_gw = torch.autograd.grad(loss, (h, w))
    assert_close_grad(got.grad_hidden.cpu(), ref_gh, torch.float32, "grad_hidden")
    assert_close_grad(got.grad_weight.cpu(), ref_gw, torch.float32, "grad_weight")


def _every_entry_point(backend, s_h, s_w, t_h, t_w, targets, coefficient, *, cast=None) -> dict[str, torch.Tensor]:
    """Outputs and gradients of all four entry points on one problem, by name: the statistics with
    and without a teacher (gradients w.r.t. the student's hidden states and head by autograd), and
    both fused updates. `cast`: hand every entry point the inputs cast to that dtype (through
    differentiable casts, so gradients come back in the inputs' own dtypes)."""
    from fire_kernels import fused_update

    def given(x):
        return x if cast is None else x.to(cast)

    h, w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
    stats = teacher_student_stats(
        given(h), given(w), given(t_h), given(t_w), targets, divergence="jsd", backend=backend
    )
    log_prob, entropy = token_stats(given(h), given(w), targets, backend=backend)
    loss = sum((c * x).sum() for c, x in zip((1.0, -0.5, 2.0, 0.3), (*stats[:2], stats.divergence, log_prob)))
    # the reference's backward is autograd's, which autocast reaches when backward() runs inside it
    with torch.autocast(s_h.device.type, enabled=False):
        grad_h, grad_w = torch.autograd.grad(loss + entropy.sum(), (h, w))
    outputs = {
        **stats._asdict(),
        "log_prob": log_prob,
        "entropy": entropy,
        "grad_hidden": grad_h,
        "grad_weight": grad_w,
    }
    if backend == "reference":  # no fused update
        return outputs

    def fused(x):  # the fused updates return plain tensors: the caller's dtype is restored here
        return x if cast is None or not x.is_floating_point() else x.to(s_h.dtype)

    dense = fused_update.linear_divergence_update(
        given(s_h), given(s_w), given(t_h), given(t_w), targets, coefficient, backend=backend
    )
    sampled = fused_update.linear_log_prob_update(
        given(s_h), given(s_w), targets, lambda lp, rows: ((coefficient[rows] * lp).sum(), coefficient[rows]),
        backend=backend,
    )  # fmt: skip
    for prefix, update in (("dense", dense), ("sampled", sampled)):
        outputs.update({f"{prefix} {name}": fused(x) for name, x in update._asdict().items() if x is not None})
    return outputs


@pytest.mark.parametrize("whole_rows", [True, False])
@pytest.mark.parametrize("backend", ["chunked", "triton", "reference"])
def test_autocast_computes_in_its_dtype(monkeypatch, backend, whole_rows):
    """Under bf16 `torch.autocast` on the device (TRL's Trainer computes its loss in CPU autocast
    under transformers 4.x; our trainer runs a float32 student's forwards there on CUDA) every entry
    point computes what it computes outside autocast on the inputs cast to bf16, as autocast does
    for a matmul and the fused-linear peers do before their kernels, backward included; the
    gradients come back in the inputs' float32. Exactly on the CPU; on CUDA the backward's fp32
    atomics add in any order, so the gradients (rounded to bf16) may differ by a bf16 ulp, and the
    rest by float32 rounding. Before c1e8593 the products stayed float32 (at float32 speed; the
    statistics then differ by ~1e-2), and before 2ab5c12 the fused updates' whole-row
    `mm(out=float32)` met a bf16 operand. `whole_rows` False sends the fused updates down the
    streaming path."""
    from fire_kernels import fused_update

    if not whole_rows:
        monkeypatch.setattr(fused_update, "_whole_row_limit", lambda *_: 1)
    n, vocab, d = (300, 4_099, 64) if ON_CUDA else (19, 37, 16)
    device = DEVICE if backend != "reference" else torch.device("cpu")
    s_h, s_w, t_h, t_w, targets = (x.to(device) for x in make_problem(n, vocab, d, d + 8, torch.float32, seed=5))
    coefficient = torch.randn(n, generator=torch.Generator().manual_seed(6)).to(device)
    problem = (backend, s_h, s_w, t_h, t_w, targets, coefficient)

    expected = _every_entry_point(*problem, cast=torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = _every_entry_point(*problem)
    assert list(got) == list(expected) and len(got) >= 9
    exact = device.type == "cpu"
    for name, b in expected.items():
        a = got[name]
        assert a.dtype == b.dtype, name
        if exact:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        elif "grad" in name:  # one bf16 ulp (2^-8 relative) of the largest entry
            torch.testing.assert_close(
                a, b, rtol=2**-7, atol=2**-8 * float(b.abs().max()), msg=lambda m: f"{name}: {m}"
            )
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # and they are bf16 products, not float32 ones: the float32 run differs
    float32 = _every_entry_point(*problem)
    assert not torch.allclose(got["student_log_prob"], float32["student_log_prob"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_autocast_leaves_float64_and_harmonizes_mixed_dtypes(backend):
    """Autocast's casting rule, not a blanket one: float64 inputs stay float64 (autocast never
    casts them), and a float32 student with a bf16 teacher head, refused outside autocast (one
    dtype per model), is accepted inside it, both cast to bf16."""
    s_h, s_w, t_h, t_w, targets = make_problem(13, 37, 16, 24, torch.float64, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = token_stats(s_h, s_w, targets, backend=backend)
    torch.testing.assert_close(lp, token_stats(s_h, s_w, targets, backend=backend)[0], rtol=0, atol=0)
    assert lp.dtype == ent.dtype == torch.float64

    s_h, s_w = s_h.float(), s_w.float()
    with pytest.raises(TypeError, match="share a dtype"):
        teacher_student_stats(s_h, s_w.bfloat16(), t_h.float(), t_w.float(), targets, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher_student_stats(s_h, s_w.bfloat16(), t_h.float(), t_w.float(), targets, backend=backend)
    want = teacher_student_stats(*(x.bfloat16() for x in (s_h, s_w, t_h, t_w)), targets, backend=backend)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_int64_offsets_past_two_to_the_31(backend):
    """N x V > 2^31 logits (never materialized): rows at the end of the batch are right, so no
    offset wrapped around in int32."""
    n, vocab, d = 17_000, 131_075, 16  # 2.23e9 logits
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, d, generator=gen).to(DEVICE, torch.bfloat16)
    w = (torch.randn(vocab, d, generator=gen) / 4).to(DEVICE, torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    lp, ent = token_stats(h, w, targets, backend=backend)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1])
    logits = h[rows].double().cpu() @ w.double().cpu().t()
    log_p = logits.log_softmax(-1)
    expected_lp = log_p.gather(1, targets[rows].cpu()[:, None]).squeeze(1)
    expected_ent = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(lp[rows].double().cpu(), expected_lp, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ent[rows].double().cpu(), expected_ent, atol=2e-3, rtol=2e-3)


# The trainer tests below run on the test device: on a GPU (`make gpu-check`) they check what only
# a GPU computes (bf16 autocast, native bf16 dots, CUDA RNG states, models on the device); on the
# CPU (`make test`) the same code runs, so that the tests cannot rot between the days a GPU is lent.
#: the autocast a float32 model's forwards run under on the test device (forwards.autocast)
MODEL_AUTOCAST = torch.bfloat16 if TEST_DEVICE == "cuda" else None


def _autocast_now():
    """The autocast dtype in force on the test device, None when it is off."""
    return torch.get_autocast_dtype(TEST_DEVICE) if torch.is_autocast_enabled(TEST_DEVICE) else None


def _demo_config(output_dir, **overrides):
    """The demo setting's recipe, a few small steps on the test device (the trainer tests below)."""
    from fire_opd.demo.run import get_setting

    return get_setting("steps").recipe.updated(
        {
            "optim.steps": 2,
            "sampling.prompts_per_step": 8,
            "optim.micro_batch_size": 8,
            "eval.every": 0,
            "eval.size": 8,
            "output_dir": str(output_dir),
            "runtime.device": TEST_DEVICE,
            **overrides,
        }
    )


@pytest.mark.parametrize(
    "objective,dtype,teacher_dtype",
    [
        ("full_vocab", "float32", None),
        ("sampled", "float32", None),
        ("full_vocab", "float32", "bfloat16"),
        ("full_vocab", "bfloat16", None),
    ],
)
def test_trainer_smoke(tmp_path, objective, dtype, teacher_dtype):
    """Two steps of the demo recipe with the fused update: finite losses, weights move. On a GPU a
    float32 student computes under bf16 autocast (beside bf16 teachers too, the memory-saving
    setting), and a bf16 student computes in bf16 (the kernels' native bf16 dots, which the CPU
    interpreter cannot run) and trains through the optimizer's float32 master weights."""

    from fire_opd.demo.build_assets import ASSETS_DIR
    from fire_opd.demo.run import get_setting, train_student
    from fire_opd.train.models import load_causal_lm

    config = _demo_config(
        tmp_path,
        **{
            "loss.objective": objective,
            "runtime.fused_update": True,
            "models.dtype": dtype,
            "models.teacher_dtype": teacher_dtype,
        },
    )
    before = [p.detach().clone() for p in load_causal_lm(ASSETS_DIR / get_setting("steps").student).parameters()]
    run = train_student("steps", config)
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in run["history"])
    assert all(h["train/step_skipped"] == 0.0 for h in run["history"])
    trainer = run["trainer"]
    params = list(trainer.student.parameters())
    assert {p.dtype for p in params} == {getattr(torch, dtype)}
    assert {p.device.type for p in params} == {TEST_DEVICE}
    teacher_params = [p for teacher in trainer.teachers.values() for p in teacher.parameters()]
    assert {p.dtype for p in teacher_params} == {getattr(torch, teacher_dtype or dtype)}
    # Nearly every weight the optimizer trains moves: 99.8 % on the CPU after these two steps. A
    # bf16 student's are its float32 master copies, which it computes with rounded to nearest (in
    # place, without master weights, 14 % of its bf16 weights moved on the CPU).
    trained = [trainer.optimizer.state[p].get("master", p) for p in params]
    assert {t.dtype for t in trained} == {torch.float32}
    initial = [b.to(p.dtype).to(torch.float32) for p, b in zip(params, before)]  # as the run loaded them
    moved = sum(int((t.detach().cpu() != b).sum()) for t, b in zip(trained, initial))
    assert moved > 0.9 * sum(p.numel() for p in params), (moved, sum(p.numel() for p in params))
    assert all(torch.equal(p, t.to(p.dtype)) for p, t in zip(params, trained))
    if dtype != "float32":
        return
    # the float32 student samples under the autocast its forwards run in
    modes: set = set()
    hook = trainer.student.register_forward_pre_hook(lambda module, args: modes.add(_autocast_now()))
    try:
        trainer.sample()
    finally:
        hook.remove()
    assert modes == {MODEL_AUTOCAST}


def test_verified_filter_step(tmp_path):
    """`fire.filter_mode: verified`: a step runs end to end, and the float32 teachers continue the
    flagged rollouts under the autocast they scored them in: bf16 on a GPU (on the CPU there is
    none, and tests/test_trainer.py records that the trainer enters it)."""

    from fire_opd.demo.run import train_student

    config = _demo_config(
        tmp_path,
        **{
            "optim.steps": 1,
            "fire.method": "filter_only",
            "fire.filter_mode": "verified",
            "fire.percentile": 60.0,
            "fire.divergence_prob": 0.9,
        },
    )
    run = train_student("steps", config)
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in run["history"])
    trainer = run["trainer"]
    modes: set = set()
    hooks = [
        teacher.register_forward_pre_hook(lambda module, args: modes.add(_autocast_now()))
        for teacher in trainer.teachers.values()
    ]
    try:
        problems, rollouts = trainer.sample()
        keys = [p.teacher for p in problems]
        plan = trainer.plan(keys)
        scores = trainer.score(rollouts, keys)
        modes.clear()  # the scoring's own forwards aside: only the continuations count
        reliable, metrics = trainer.verify(rollouts, problems, scores, plan)
    finally:
        for hook in hooks:
            hook.remove()
    assert metrics["fire/verified_rollouts"] > 0 and reliable is not None
    assert modes == {MODEL_AUTOCAST}


def test_a_bf16_run_resumes(tmp_path):
    """A bf16 student's checkpoint resumes on the test device: on a GPU the CUDA RNG states go
    through the checkpoint, and the optimizer's float32 master weights and moments come back on the
    device as they were saved. The resumed step then matches the one the uninterrupted run takes
    from the same state (up to the kernels' atomics, which add in any order on a GPU; the CPU suite
    checks that a resume is bit-exact). The trainers are built here, not by `train_student`,
    because the test reads their state before they train."""
    from fire_opd.demo.build_assets import ASSETS_DIR
    from fire_opd.demo.run import load_setting, problem_sets
    from fire_opd.train.health import ANSWER_FORMATS
    from fire_opd.train.models import load_causal_lm
    from fire_opd.train.trainer import FireOPDTrainer

    def trainer(output_dir, **overrides) -> FireOPDTrainer:
        config = _demo_config(output_dir, **{"optim.steps": 3, "models.dtype": "bfloat16", **overrides})
        setting, tokenizer, teachers = load_setting("steps")
        train, evaluation = problem_sets(setting, config.seed, config.eval.size)
        return FireOPDTrainer(
            config, student=load_causal_lm(ASSETS_DIR / setting.student), teachers=teachers, tokenizer=tokenizer,
            train_problems=train, eval_problems=evaluation, answer_formats=ANSWER_FORMATS,
        )  # fmt: skip

    def optimizer_state(run: FireOPDTrainer) -> list[dict]:
        return [
            {key: value.detach().clone() for key, value in run.optimizer.state[p].items()}
            for p in run.student.parameters()
        ]

    uninterrupted = trainer(tmp_path / "a")
    uninterrupted.train(until_step=2)
    saved = optimizer_state(uninterrupted)
    ckpt = uninterrupted.save_checkpoint(tmp_path / "a" / "interrupted")
    history = uninterrupted.train()

    resumed = trainer(tmp_path / "b", **{"checkpoint.resume_from": str(ckpt)})
    assert resumed.step == 2
    restored = optimizer_state(resumed)
    assert [sorted(s) for s in restored] == [sorted(s) for s in saved]
    for before, after in zip(saved, restored):
        assert after["master"].device.type == TEST_DEVICE and after["master"].dtype == torch.float32
        for key, value in before.items():
            assert torch.equal(after[key].cpu(), value.cpu()), key
    resumed_history = resumed.train()
    assert resumed.step == 3
    a, b = history[-1], resumed_history[-1]
    assert a["fire/keep_ratio"] == b["fire/keep_ratio"]  # the same rollouts and selection
    assert abs(a["train/loss"] - b["train/loss"]) <= 1e-3 * abs(a["train/loss"]), (a["train/loss"], b["train/loss"])


def test_a_lora_student_trains(tmp_path):
    """A LoRA student on the test device (on a GPU its adapters are made on the device, under a
    forked CUDA RNG): only the adapters train, all of them on the device, and the base weights stay
    as loaded."""
    from fire_opd.demo.build_assets import ASSETS_DIR
    from fire_opd.demo.run import get_setting, train_student
    from fire_opd.train.models import load_causal_lm

    config = _demo_config(tmp_path, **{"lora.r": 4, "lora.alpha": 8.0, "lora.target_modules": ["q_proj", "v_proj"]})
    base = dict(load_causal_lm(ASSETS_DIR / get_setting("steps").student).named_parameters())
    run = train_student("steps", config)
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in run["history"])
    named = dict(run["trainer"].student.named_parameters())
    adapters = {name: p for name, p in named.items() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    assert {p.device.type for p in named.values()} == {TEST_DEVICE}
    # lora_B starts at zero, so a trained adapter pair is one whose B moved
    assert all(p.detach().abs().sum() > 0 for name, p in adapters.items() if "lora_B" in name)
    frozen = {name: p for name, p in named.items() if not p.requires_grad}
    for name, p in frozen.items():
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach().cpu(), base[original].to(p.dtype)), name


def test_trl_distillation_with_padded_heads(tmp_path, monkeypatch):
    """FiRe-OPD inside TRL's DistillationTrainer on the test device; on a GPU as most of our users
    run it: bf16 mixed precision (accelerate's autocast on CUDA, which transformers 5 does not enter
    on the CPU) and heads padded past the tokenizer (24 rows, 18 tokens; the case that crashed
    inside TRL). Two steps train every parameter with finite losses, and no padded id is sampled."""
    pytest.importorskip("trl")
    from test_integration_trl import _trainer

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # TrainingArguments sets it; restored after
    trainer = _trainer(tmp_path, padded_rows=24, max_steps=2, use_cpu=TEST_DEVICE == "cpu", bf16=True)
    assert trainer.fire_vocab_size == len(trainer.processing_class) == 18
    assert next(trainer.model.parameters()).device.type == TEST_DEVICE
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert [name for name, p in trainer.model.named_parameters() if torch.equal(before[name], p)] == []
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses and all(math.isfinite(x) for x in losses)
    padded = [row["fire/padded_id_tokens"] for row in trainer.state.log_history if "fire/padded_id_tokens" in row]
    assert padded and all(v == 0.0 for v in padded)
