"""The trainer on tiny random models: single and multi-teacher runs, exact resume, bad input."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from fire_opd.algorithm.options import FireOptions
from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
from fire_opd.train.config import TrainConfig, dotted
from fire_opd.train.data import load_prompts, write_prompts
from fire_opd.train.trainer import FireOPDTrainer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(TASK_ALPHABET)


def _model(tokenizer, seed, hidden=32, vocab=None):
    return tiny_llama(
        vocab or len(tokenizer), hidden, 1, 2, seed=seed, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id
    )


def _config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "run"),
        steps=3,
        prompts_per_step=4,
        samples_per_prompt=2,
        micro_batch_size=3,
        max_new_tokens=6,
        lr=1e-3,
        warmup_steps=1,
        eval_every=2,
        eval_size=8,
        progress=False,
        seed=5,
        percentile=25.0,
        objective="sampled",
    )
    base.update(overrides)
    return TrainConfig.from_dict({"logging.report_to": [], **dotted(base)})


def _trainer(tokenizer, config, tasks=("arith",), teacher_names=("arith",), student_seed=0):
    train = sample_problems(tasks, 40, seed=1, split="train")
    held_out = sample_problems(tasks, 8, seed=2, split="test")
    teachers = {name: _model(tokenizer, 10 + i, hidden=48) for i, name in enumerate(teacher_names)}
    return FireOPDTrainer(
        config,
        student=_model(tokenizer, student_seed),
        teachers=teachers,
        tokenizer=tokenizer,
        train_problems=train,
        eval_problems=held_out,
    )


@pytest.mark.parametrize("method,fused", [("fire", True), ("fire", False), ("opd", True), ("hard_token", True)])
def test_single_teacher_run(tmp_path, tokenizer, method, fused):
    trainer = _trainer(tokenizer, _config(tmp_path, method=method, fused_update=fused))
    before = [p.detach().clone() for p in trainer.student.parameters()]
    history = trainer.train()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history)
    assert "eval/accuracy" in history[1] and "eval/accuracy" in history[2]
    for key in ("fire/keep_ratio", "fire/weight_mean", "fire/clip_frac", "fire/reverse_kl", "train/grad_norm"):
        assert key in history[0], key
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    # the initial student's evaluation (step 0), then one row per step
    assert len(lines) == 4 and [json.loads(line)["train/step"] for line in lines] == [0, 1, 2, 3]
    assert trainer.state.initial_eval == {k: v for k, v in json.loads(lines[0]).items() if k.startswith("eval/")}
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file() and (final / "trainer_state.json").is_file()
    assert (final / "optimizer.pt").is_file() and not (final / "trainer_state.pt").exists()
    assert (final / "tokenizer.json").is_file()


def test_multi_teacher_run_routes_by_key(tmp_path, tokenizer):
    trainer = _trainer(
        tokenizer,
        _config(tmp_path, stats_scope="micro_batch"),
        tasks=("arith", "reverse"),
        teacher_names=("arith", "reverse"),
    )
    history = trainer.train()
    assert "eval/accuracy_arith" in history[-1] and "eval/accuracy_reverse" in history[-1]
    # Each rollout is scored by its own teacher: re-score one batch and compare with a manual route.
    from fire_opd.train.rollouts import generate_rollouts

    problems = trainer.train_problems[:4]
    rollouts = generate_rollouts(trainer.student, tokenizer, [p.prompt for p in problems], max_new_tokens=4)
    scored = trainer.score(rollouts, [p.teacher for p in problems])
    for i, p in enumerate(problems):
        alone = trainer.score(_subset(rollouts, i), [p.teacher])
        torch.testing.assert_close(scored[2][i], alone[2][0], rtol=1e-5, atol=1e-5)


def _subset(rollouts, i):
    from fire_opd.train.rollouts import Rollouts

    return Rollouts(
        rollouts.prompt_ids[i : i + 1],
        rollouts.prompt_mask[i : i + 1],
        rollouts.response_ids[i : i + 1],
        rollouts.response_mask[i : i + 1],
        rollouts.texts[i : i + 1],
    )


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path, tokenizer):
    full = _trainer(tokenizer, _config(tmp_path / "a", steps=4))
    full_history = full.train()

    first = _trainer(tokenizer, _config(tmp_path / "b", steps=4))
    first.train(until_step=2)
    ckpt = first.save_checkpoint(tmp_path / "b" / "interrupted")
    del first
    resumed = _trainer(tokenizer, _config(tmp_path / "b", steps=4, resume_from=str(ckpt)), student_seed=123)
    assert resumed.step == 2
    resumed_history = resumed.train()
    assert len(resumed_history) == 4
    for a, b in zip(full_history, resumed_history):
        for key in ("train/loss", "fire/keep_ratio", "fire/weight_mean", "train/grad_norm"):
            assert a[key] == b[key], (key, a[key], b[key])
    for (name, p), q in zip(full.student.named_parameters(), resumed.student.parameters()):
        assert torch.equal(p, q), name


def test_a_teacher_head_short_of_the_tokenizer_is_refused(tmp_path, tokenizer):
    """Heads may be padded past the tokenizer (tests/test_padded_vocab.py), never short of it."""
    config = _config(tmp_path)
    with pytest.raises(ValueError, match="teacher 'arith' has 12 lm_head rows but the tokenizer has 18 tokens"):
        FireOPDTrainer(
            config,
            student=_model(tokenizer, 0),
            teachers={"arith": _model(tokenizer, 1, vocab=12)},
            tokenizer=tokenizer,
            train_problems=sample_problems(["arith"], 4, seed=0, split="train"),
        )


def _family(name: str, tokenizer, seed: int):
    """A tiny random model of one Hugging Face family: nine decoder families users distill (tied and
    untied embeddings, MoE, GPT-2's own layout) and the heads that are more than h @ W^T."""
    import transformers

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    tied = dict(common, tie_word_embeddings=True)
    torch.manual_seed(seed)
    builders = {
        "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**tied, head_dim=16)),
        "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(
                **common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16
            )
        ),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)),
        "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**common, head_dim=16)),
        "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**common)),
        "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**tied, head_dim=16)),
        "olmo2": lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common)),
        "smollm3": lambda: transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**tied)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=len(tokenizer),
                n_embd=32,
                n_layer=1,
                n_head=2,
                n_positions=64,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None,
            )
        ),
        # heads with more than h @ W^T
        "gemma2": lambda: transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(  # final_logit_softcapping
                **common, head_dim=16, final_logit_softcapping=3.0
            )
        ),
        "cohere": lambda: transformers.CohereForCausalLM(
            transformers.CohereConfig(  # logits * logit_scale
                **common, logit_scale=0.5
            )
        ),
        "granite": lambda: transformers.GraniteForCausalLM(
            transformers.GraniteConfig(  # logits / logits_scaling
                **common, logits_scaling=4.0
            )
        ),
    }
    if name in builders:
        return builders[name]()
    model = _model(tokenizer, seed)  # "bias": llama with an lm_head bias
    model.lm_head.bias = torch.nn.Parameter(torch.randn(len(tokenizer)))
    return model


FAMILIES = [
    "qwen3",
    "qwen3_moe",
    "qwen2",
    "mistral",
    "phi3",
    "gemma",
    "olmo2",
    "smollm3",
    "gpt2",
    "gemma2",
    "cohere",
    "granite",
    "bias",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_families_equal_the_models_own_logits_and_train(tmp_path, tokenizer, family):
    """The trainer's hidden-state log-probs and entropies equal each model's own logits (scale,
    soft-cap and bias read from its config), and every family trains for two steps under both
    objectives: the head (tied or not) moves, and a bias gets gradient."""
    from fire_opd.ops.heads import lm_head, response_hidden_states
    from fire_opd.ops.loss_from_hidden import response_token_stats

    model = _family(family, tokenizer, 0).eval()
    ids = torch.randint(3, len(tokenizer), (3, 9))
    attn = torch.ones_like(ids)
    prompt_len = 4
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, prompt_len - 1 : -1] / 0.7
        hidden = response_hidden_states(model, ids, attn, prompt_len)
        stats = response_token_stats(
            hidden,
            lm_head(model),
            ids[:, prompt_len:],
            torch.ones(3, 5, dtype=torch.bool),
            temperature=0.7,
            backend="chunked",
        )
    log_p = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(
        stats.student_log_prob, log_p.gather(-1, ids[:, prompt_len:, None]).squeeze(-1), atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(stats.student_entropy, -(log_p.exp() * log_p).sum(-1), atol=2e-5, rtol=1e-5)

    student = _family(family, tokenizer, 0)
    teacher = _family(family, tokenizer, 1)
    for objective in ("full_vocab", "sampled"):
        config = _config(tmp_path / objective, steps=2, eval_every=0, eval_size=4, objective=objective)
        trainer = FireOPDTrainer(
            config,
            student=student,
            teachers={"arith": teacher},
            tokenizer=tokenizer,
            train_problems=sample_problems(["arith"], 16, seed=0, split="train"),
        )
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        head_before = lm_head(student).weight.detach().clone()
        history = trainer.train()
        assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history)
        assert not torch.equal(head_before, lm_head(student).weight)
        unchanged = [n for n, p in student.named_parameters() if torch.equal(before[n], p)]
        assert not unchanged, unchanged  # every parameter gets gradient (MoE router and experts included)
        if family == "bias":
            assert not torch.equal(before["lm_head.bias"], student.lm_head.bias)


def test_unsupported_heads_are_refused(tmp_path, tokenizer):
    student = _model(tokenizer, 0)
    student.config.output_mult = 2.0
    with pytest.raises(ValueError, match=r"output multiplier \(muP-style heads\) \(output_mult=2.0\)"):
        FireOPDTrainer(
            _config(tmp_path),
            student=student,
            teachers={"arith": _model(tokenizer, 1)},
            tokenizer=tokenizer,
            train_problems=sample_problems(["arith"], 4, seed=0, split="train"),
        )


def test_missing_teacher_key_in_multi_teacher_mode(tmp_path, tokenizer):
    problems = sample_problems(["arith"], 4, seed=0, split="train")
    problems[2] = type(problems[2])(problems[2].prompt, problems[2].answer, None)
    with pytest.raises(KeyError, match="row 2 has no teacher key"):
        FireOPDTrainer(
            _config(tmp_path),
            student=_model(tokenizer, 0),
            teachers={"arith": _model(tokenizer, 1), "reverse": _model(tokenizer, 2)},
            tokenizer=tokenizer,
            train_problems=problems,
        )


def test_malformed_prompt_files(tmp_path):
    good = tmp_path / "good.jsonl"
    write_prompts(sample_problems(["arith"], 3, seed=0, split="train"), good)
    assert len(load_prompts(good)) == 3
    cases = {
        '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=" "answer": "4"}\n': ":2: not valid JSON",
        '{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2="}\n': ":3: missing or non-string field 'answer'",
        '{"prompt": "1+1=", "answer": "2"}\n[1, 2]\n': ":2: expected a JSON object, got list",
        "[1, 2]\n": "expected JSON lines \\(one object per line\\) or a JSON array of objects",
        '{"prompt": "1=", "answer": "1", "teacher": 3}\n': "column 'teacher' must hold strings, not int64",
        "": "no prompts found",
    }
    for i, (text, match) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_prompts(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("student: s\nteachers: {a: t}\nprompts: p.jsonl\nlr: 0.001\nadam_betas: [0.9, 0.95]\n")
    config = TrainConfig.from_yaml(path, ["lr=3e-4", "method=opd", "teachers={a: t, b: u}", "tokenizer=tok"])
    assert config.optim.lr == 3e-4 and config.fire.method == "opd" and config.models.teachers == {"a": "t", "b": "u"}
    assert config.optim.adam_betas == (0.9, 0.95) and config.models.tokenizer == "tok"
    with pytest.raises(ValueError, match="unknown config field"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig.from_dict({"fire.method": "ppo"})
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        TrainConfig.from_dict({"optim.micro_batch_size": 0})


@pytest.mark.parametrize("stats_scope", ["batch", "micro_batch"])
def test_dense_objective_multi_teacher_accumulates_to_the_whole_batch_gradient(tmp_path, tokenizer, stats_scope):
    """objective=full_vocab: micro-batches (one teacher each, teacher hidden states recomputed)
    accumulate to the gradient of one whole-batch step; fused and autograd paths agree."""
    grads = {}
    for name, micro_batch_size, fused in (("small", 3, True), ("whole", 64, True), ("autograd", 3, False)):
        config = _config(
            tmp_path / name,
            steps=1,
            objective="full_vocab",
            divergence="jsd",
            jsd_beta=0.7,
            micro_batch_size=micro_batch_size,
            fused_update=fused,
            eval_every=0,
            eval_size=0,
            loss_agg_mode="seq-mean-token-mean",
            max_grad_norm=1e9,
            stats_scope=stats_scope,
        )
        trainer = _trainer(tokenizer, config, tasks=("arith", "reverse"), teacher_names=("arith", "reverse"))
        history = trainer.train()
        assert 0 < history[0]["fire/keep_ratio"] < 1 and history[0]["fire/divergence"] > 0
        grads[name] = [p.grad.clone() for p in trainer.student.parameters()]
    if stats_scope == "batch":
        for a, b in zip(grads["small"], grads["whole"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(grads["small"], grads["autograd"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_objective_options_are_validated():
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainConfig.from_dict({"loss.objective": "dense"})
    with pytest.raises(ValueError, match="divergence must be one of"):
        TrainConfig.from_dict({"loss.divergence": "kl"})
    with pytest.raises(ValueError, match="jsd_beta must be in"):
        TrainConfig.from_dict({"loss.jsd_beta": 1.5})
    with pytest.raises(ValueError, match="filter_score must be one of"):
        TrainConfig.from_dict({"fire.filter_score": "median"})
    with pytest.raises(ValueError, match=r"teacher_confidence_gate must be in \[0, 1\]"):
        TrainConfig.from_dict({"fire.teacher_confidence_gate": -0.1})


def test_trainer_passes_the_hypothesis_options_to_the_loss(tmp_path, tokenizer, monkeypatch):
    """filter_score and teacher_confidence_gate reach compute_fire_advantages from TrainConfig."""
    import fire_opd.train.update as trainer_module

    seen = []
    real = trainer_module.compute_fire_advantages

    def spy(*args, **kwargs):
        seen.append((kwargs["fire"].filter_score, kwargs["fire"].teacher_confidence_gate))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_fire_advantages", spy)
    config = _config(tmp_path, steps=1, eval_every=0, filter_score="advantage_mean", teacher_confidence_gate=0.3)
    _trainer(tokenizer, config).train()
    assert seen and all(s == ("advantage_mean", 0.3) for s in seen)


def _released_fire(old_lp, teacher_lp, student_entropy, teacher_entropy, mask, percentile, alpha=1.0, beta=1.0):
    """The released FiRe-OPD formula, written again in numpy from the paper's code (steps
    1-4 of fire_opd.algorithm): batch-wide np.percentile filter on the mean teacher log-prob, confidence and
    confusion normalized by the batch maxima, weights divided by their mean over valid tokens."""
    import numpy as np

    lp_t, lp_old = teacher_lp.double().numpy(), old_lp.double().numpy()
    h_s, h_t, m = student_entropy.double().numpy(), teacher_entropy.double().numpy(), mask.numpy().astype(bool)
    score = (lp_t * m).sum(1) / np.maximum(m.sum(1), 1)
    keep = score >= np.percentile(score[m.any(1)], percentile)
    confidence = np.clip(1 - h_t / h_t[m].max(), 0, 1)
    confusion = np.clip(h_s / h_s[m].max(), 0, 1)
    weights = (1 + alpha * confidence) * (1 + beta * confusion)
    weights = weights / weights[m].mean()
    advantages = (lp_t - lp_old) * weights * keep[:, None] * m
    return keep, weights, advantages


def test_fire_on_the_trainers_own_batches_equals_the_released_formula(tmp_path, tokenizer, monkeypatch):
    """Rule out defects on real batches: rows in the order the trainer holds them, two teachers
    routed by key. Keep decisions, weights and advantages equal the released formula, and the
    trainer's loss equals `fire_policy_loss` on the same batch."""
    import fire_opd.train.update as trainer_module
    from fire_opd.algorithm.objectives import fire_policy_loss
    from fire_opd.algorithm.selection import compute_fire_advantages

    captured = []

    def spy(*args, **kwargs):
        result = compute_fire_advantages(*args, **kwargs)
        captured.append((args, kwargs, result))
        return result

    monkeypatch.setattr(trainer_module, "compute_fire_advantages", spy)
    config = _config(
        tmp_path,
        steps=2,
        method="fire",
        percentile=30.0,
        micro_batch_size=64,
        eval_every=0,
        eval_size=0,
        prompts_per_step=6,
        samples_per_prompt=3,
    )
    trainer = _trainer(tokenizer, config, tasks=("arith", "reverse"), teacher_names=("arith", "reverse"))
    history = trainer.train()
    assert len(captured) == 2
    for (old_lp, teacher_lp, student_entropy, teacher_entropy, mask), _kwargs, fire in captured:
        keep, weights, advantages = _released_fire(old_lp, teacher_lp, student_entropy, teacher_entropy, mask, 30.0)
        assert fire.kept_rollouts.tolist() == keep.tolist()
        assert 0 < int(fire.kept_rollouts.sum()) < len(keep)
        loss_mask = fire.loss_mask.numpy()
        torch.testing.assert_close(
            fire.token_weights[fire.loss_mask], torch.tensor(weights[loss_mask]).float(), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(fire.advantages, torch.tensor(advantages).float(), rtol=1e-5, atol=1e-6)
    # the first step's update starts from the sampler's parameters: ratio 1, so the loss is -mean(A)
    (old_lp, teacher_lp, student_entropy, teacher_entropy, mask), _, _ = captured[0]
    loss, _ = fire_policy_loss(
        old_lp,
        old_lp,
        teacher_lp,
        student_entropy,
        teacher_entropy,
        mask,
        fire=FireOptions(method="fire", percentile=30.0),
    )
    assert history[0]["train/loss"] == pytest.approx(float(loss), rel=1e-4, abs=1e-6)


def test_the_fire_released_preset_is_the_released_loss_on_one_batch(tmp_path, tokenizer, monkeypatch):
    """`preset: fire-released`: one rollout per prompt, the sampled objective, FiRe's statistics
    inside each micro-batch of one rollout. Its first step's loss equals the released code's on the
    same rollouts: per rollout, the filter of one trajectory keeps it, its weights are normalized
    by its own entropy maxima and mean, and the loss is the mean of the rollouts' token means."""
    import fire_opd.train.update as trainer_module
    from fire_opd.algorithm.selection import compute_fire_advantages

    captured = []

    def spy(*args, **kwargs):
        result = compute_fire_advantages(*args, **kwargs)
        captured.append((args, result))
        return result

    monkeypatch.setattr(trainer_module, "compute_fire_advantages", spy)
    config = TrainConfig.from_dict(
        {
            "preset": "fire-released",
            "output_dir": str(tmp_path / "run"),
            "logging.report_to": [],
            **dotted(dict(steps=1, prompts_per_step=5, max_new_tokens=6, eval_every=0, eval_size=0, progress=False)),
        }
    )
    assert (config.loss.objective, config.loss.stats_scope) == ("sampled", "micro_batch")
    assert (config.sampling.samples_per_prompt, config.optim.micro_batch_size, config.fire.method) == (1, 1, "fire")
    history = _trainer(tokenizer, config).train()
    assert len(captured) == 5  # one selection per rollout
    per_rollout = []
    for (old_lp, teacher_lp, student_entropy, teacher_entropy, mask), fire in captured:
        keep, _, advantages = _released_fire(old_lp, teacher_lp, student_entropy, teacher_entropy, mask, 20.0)
        assert keep.tolist() == [True] and fire.kept_rollouts.tolist() == [True]  # the filter drops nothing
        torch.testing.assert_close(fire.advantages, torch.tensor(advantages).float(), rtol=1e-5, atol=1e-6)
        per_rollout.append(-float(advantages.sum()) / int(mask.sum()))  # ratio 1: the token mean of -A
    assert history[0]["train/loss"] == pytest.approx(sum(per_rollout) / len(per_rollout), rel=1e-4, abs=1e-6)


def test_reweighting_changes_the_update(tmp_path, tokenizer):
    """reweight_only must not be OPD in disguise: its weights vary over the loss tokens and its
    gradient differs from OPD's on the same rollouts."""
    from fire_opd.demo.build_assets import ASSETS_DIR
    from fire_opd.train.models import load_causal_lm, load_tokenizer

    shipped_tokenizer = load_tokenizer(ASSETS_DIR / "tokenizer")
    teachers = {"arith": load_causal_lm(ASSETS_DIR / "teacher_arith")}
    grads, weights = {}, {}
    for method in ("opd", "reweight_only"):
        config = _config(
            tmp_path / method,
            steps=1,
            method=method,
            eval_every=0,
            eval_size=0,
            max_grad_norm=1e9,
            max_new_tokens=8,
            micro_batch_size=64,
        )
        trainer = FireOPDTrainer(
            config,
            student=load_causal_lm(ASSETS_DIR / "student_init"),
            teachers=teachers,
            tokenizer=shipped_tokenizer,
            train_problems=sample_problems(["arith"], 40, seed=1, split="train"),
        )
        history = trainer.train()
        grads[method] = torch.cat([p.grad.flatten() for p in trainer.student.parameters()])
        weights[method] = (history[0]["fire/weight_min"], history[0]["fire/weight_max"])
    assert weights["opd"] == (1.0, 1.0)
    low, high = weights["reweight_only"]
    assert high - low > 0.1
    assert not torch.allclose(grads["opd"], grads["reweight_only"], rtol=1e-3)


def test_non_finite_steps_change_nothing_and_stop_the_run(tmp_path, tokenizer):
    """An injected NaN loss: the step leaves weights and AdamW state as they were, is counted and
    flagged; `max_skipped_steps` of them in a row stop the run with a clear error."""
    import copy

    trainer = _trainer(tokenizer, _config(tmp_path, steps=5, eval_every=0, max_skipped_steps=2))
    trainer.train(until_step=1)
    params = [p.detach().clone() for p in trainer.student.parameters()]
    optimizer_state = copy.deepcopy(trainer.optimizer.state_dict()["state"])
    finite_forward = trainer.loss_fn.sampled

    def poisoned(*args, **kwargs):
        loss, metrics = finite_forward(*args, **kwargs)
        return loss * float("nan"), metrics

    trainer.loss_fn.sampled = poisoned
    trainer.train(until_step=2)
    last = trainer.history[-1]
    assert last["train/step_skipped"] == 1.0 and last["train/skipped_steps"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.student.parameters()))
    for index, state in trainer.optimizer.state_dict()["state"].items():
        assert all(torch.equal(value, optimizer_state[index][key]) for key, value in state.items())

    trainer.loss_fn.sampled = finite_forward  # a finite step resets the run of skipped steps
    trainer.train(until_step=3)
    assert trainer.history[-1]["train/step_skipped"] == 0.0 and trainer.history[-1]["train/skipped_steps"] == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(params, trainer.student.parameters()))

    trainer.loss_fn.sampled = poisoned
    with pytest.raises(RuntimeError, match="2 steps in a row had a non-finite loss or gradient norm"):
        trainer.train()
    assert trainer.skipped_steps == 3


def test_metrics_reach_tensorboard_and_wandb(tmp_path, tokenizer, monkeypatch):
    """`report_to: [tensorboard, wandb]`: TensorBoard's own reader loads one scalar per metric and
    step; Weights & Biases (offline) records the run under output_dir/wandb with its config and
    the last step's metrics, and a resumed run continues the same wandb run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(tmp_path, steps=2, eval_every=0, **{"logging.report_to": ["tensorboard", "wandb"]})
    trainer = _trainer(tokenizer, config)
    trainer.train()
    run_id = (tmp_path / "run" / "wandb-run-id").read_text().strip()
    (offline,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    # protobuf records: each history item holds its key and its value as JSON. wandb's service
    # process writes the file; on a loaded machine it was seen holding only its 7-byte header
    # just after finish() returned, so wait (bounded) for the records before judging them.
    records = [
        b"train/loss\x82\x01" + bytes([len(v)]) + v
        for v in (json.dumps(r["train/loss"]).encode() for r in trainer.history)
    ]
    deadline = time.monotonic() + 60
    while not all(r in (data := offline.read_bytes()) for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
    for record in records:
        assert record in data, (record, len(data))
    assert b"percentile" in data and b"samples_per_prompt" in data  # the run's config
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "fire/keep_ratio", "train/grad_norm", "eval/accuracy"} <= tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([h["train/loss"] for h in trainer.history])


def test_gradient_checkpointing_gives_the_same_step(tmp_path, tokenizer):
    """The model's own activation checkpointing recomputes the forward in backward: same loss and
    gradient norm, weights equal to float round-off."""
    runs = {}
    for flag in (False, True):
        trainer = _trainer(
            tokenizer,
            _config(tmp_path / str(flag), steps=2, eval_every=0, objective="full_vocab", gradient_checkpointing=flag),
        )
        assert getattr(trainer.student, "is_activation_checkpointing", None) in (flag, None)
        assert trainer.student.model.layers[0].gradient_checkpointing == flag
        runs[flag] = (trainer.train(), [p.detach().clone() for p in trainer.student.parameters()])
    for a, b in zip(runs[False][0], runs[True][0]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
    for p, q in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_teacher_dtype_serves_a_float32_student_from_bfloat16_teachers(tmp_path, tokenizer):
    """teacher_dtype loads the teachers in bf16 (half their memory) while the student trains in fp32."""
    from pathlib import Path

    assets = Path(__file__).resolve().parents[1] / "fire_opd" / "demo" / "assets"
    problems = sample_problems(["arith"], 16, seed=0, split="train")
    config = _config(
        tmp_path,
        steps=2,
        eval_every=0,
        objective="full_vocab",
        teacher_dtype="bfloat16",
        student=str(assets / "student_init"),
        teachers={"arith": str(assets / "teacher_arith")},
        tokenizer=str(assets / "tokenizer"),
    )
    trainer = FireOPDTrainer(config, train_problems=problems)
    assert next(trainer.teachers["arith"].parameters()).dtype == torch.bfloat16
    assert next(trainer.student.parameters()).dtype == torch.float32
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history)
    assert 0 < history[0]["train/full_vocab_reverse_kl"] < 10


def test_group_scope_ranks_each_prompts_own_rollouts(tmp_path, tokenizer, monkeypatch):
    """fire.filter_scope: group hands the selection each rollout's prompt index (rollouts of one
    prompt are adjacent), and the run drops rollouts inside every prompt's group."""
    import fire_opd.train.update as update_module

    seen = []
    real = update_module.compute_fire_advantages

    def spy(*args, **kwargs):
        selection = real(*args, **kwargs)
        seen.append((kwargs["group_ids"], selection.kept_rollouts))
        return selection

    monkeypatch.setattr(update_module, "compute_fire_advantages", spy)
    config = _config(tmp_path, steps=2, eval_every=0, samples_per_prompt=4, filter_scope="group", percentile=30.0)
    history = _trainer(tokenizer, config).train()
    assert len(seen) == 2
    for group_ids, kept in seen:
        assert group_ids.tolist() == [i // 4 for i in range(16)]
        for group in range(4):  # the 30th percentile of 4 rollouts drops one or two of each prompt's
            assert 2 <= int(kept[group * 4 : group * 4 + 4].sum()) <= 3
    assert all(0.5 <= row["fire/keep_ratio"] <= 0.75 for row in history)


def test_rollouts_and_verification_run_under_the_models_autocast_and_evaluation_does_not(
    tmp_path, tokenizer, monkeypatch
):
    """A float32 model on CUDA runs its forwards under bf16 autocast (`forwards.autocast`): the
    student's rollouts must come from that policy, and under filter_mode "verified" the teachers'
    continuations from the teachers that scored the rollouts; evaluation stays in the weights'
    dtype, as `fire-opd eval` does. On the CPU `autocast` is a no-op, so the test records what the
    trainer enters around each stage (tests/test_cuda.py checks the sampling and the verified
    continuations on a GPU)."""
    from contextlib import contextmanager

    import fire_opd.train.trainer as trainer_module

    verified = {"fire.filter_mode": "verified", "fire.divergence_prob": 0.9}
    config = _config(
        tmp_path, steps=1, eval_every=0, objective="full_vocab", method="filter_only", percentile=60.0, **verified
    )
    trainer = _trainer(tokenizer, config)
    entered: list = []
    inside: list[bool] = []

    @contextmanager
    def recording_autocast(device, dtype):
        entered.append((device, dtype))
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    def spy(name):
        real = getattr(trainer_module, name)

        def call(*args, **kwargs):
            seen[name] = bool(inside)
            return real(*args, **kwargs)

        return call

    seen: dict[str, bool] = {}
    monkeypatch.setattr(trainer_module, "autocast", recording_autocast)
    for name in ("sample_step", "verify_flagged", "eval_metrics"):
        monkeypatch.setattr(trainer_module, name, spy(name))
    problems, rollouts = trainer.sample()
    plan = trainer.plan([p.teacher for p in problems])
    reliable, metrics = trainer.verify(rollouts, problems, trainer.score(rollouts, [p.teacher for p in problems]), plan)
    trainer.evaluate()
    assert seen == {"sample_step": True, "verify_flagged": True, "eval_metrics": False}
    assert entered == [(trainer.device, "float32")] * 2
    assert reliable is not None and metrics["fire/verified_rollouts"] > 0  # the teachers did continue rollouts


def test_bf16_student_trains(tmp_path, tokenizer):
    """models.dtype: bfloat16 keeps the student's parameters in bf16 (the kernels take bf16 hidden
    states and heads); a step changes them and the loss is finite."""
    trainer = _trainer(tokenizer, _config(tmp_path, steps=2, eval_every=0, dtype="bfloat16", objective="full_vocab"))
    assert {p.dtype for p in trainer.student.parameters()} == {torch.bfloat16}
    before = [p.detach().clone() for p in trainer.student.parameters()]
    history = trainer.train()
    assert all(math.isfinite(row["train/loss"]) and row["train/step_skipped"] == 0.0 for row in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))


def test_top_p_sampling_keeps_only_the_nucleus(tokenizer):
    """top_p near 0 keeps only the most likely token at every position: the rollouts equal greedy
    decoding whatever the seed; top_p = 1 samples other completions."""
    from fire_opd.train.rollouts import generate_rollouts

    model = _model(tokenizer, 3)
    prompts = [p.prompt for p in sample_problems(["arith"], 16, seed=4, split="train")]
    greedy = generate_rollouts(model, tokenizer, prompts, max_new_tokens=6, do_sample=False)
    for seed in (0, 1):
        torch.manual_seed(seed)
        nucleus = generate_rollouts(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6)
        assert nucleus.texts == greedy.texts
    torch.manual_seed(0)
    sampled = generate_rollouts(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, top_p=1.0)
    assert sampled.texts != greedy.texts


def test_sigint_stops_at_the_step_boundary_with_a_checkpoint(tmp_path, tokenizer, monkeypatch):
    """Ctrl-C (SIGINT) during step 2 ends the run after that step with a checkpoint that a resume
    continues from, as SIGTERM does."""
    import os
    import signal

    trainer = _trainer(tokenizer, _config(tmp_path, steps=5, eval_every=0))
    real_step = trainer.train_step

    def interrupted_step():
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step()

    monkeypatch.setattr(trainer, "train_step", interrupted_step)
    history = trainer.train()
    assert trainer.stopped_by_signal == "SIGINT" and len(history) == 2
    assert (tmp_path / "run" / "step-000002").is_dir() and not (tmp_path / "run" / "final").exists()
    resumed = _trainer(tokenizer, _config(tmp_path, steps=5, eval_every=0, resume_from="latest"))
    assert resumed.step == 2 and len(resumed.train()) == 5


def test_answer_formats_are_the_demos_not_a_teacher_names():
    """A user's teacher called "chain" gets no train/malformed flags from the demo's chain format;
    the demo passes its formats."""
    from types import SimpleNamespace

    from fire_opd.train.data import Problem
    from fire_opd.train.health import ANSWER_FORMATS, rollout_health

    rollouts = SimpleNamespace(
        response_ids=torch.tensor([[5, 1], [6, 1]]), texts=["The answer is 42.", "7"]
    )  # both end with EOS (id 1)
    problems = [Problem("q", "42", teacher="chain"), Problem("q", "7", teacher="chain")]
    assert not rollout_health(rollouts, problems, eos_token_id=1)["malformed"].any()
    demo = rollout_health(rollouts, problems, eos_token_id=1, answer_formats=ANSWER_FORMATS)["malformed"]
    assert demo.tolist() == [True, True]  # neither is a chain of equations


def test_logs_and_checkpoints_are_strict_json_and_do_not_grow_with_the_run(tmp_path, tokenizer):
    """method opd has no filter threshold (it was logged as -inf, which strict JSON parsers and
    TRL's trainer_state.json reject); a checkpoint's trainer_state.json no longer carries every
    step's metrics, and a resume reads them back from metrics.jsonl."""

    def strict(text: str):
        def refuse(constant):
            raise ValueError(f"not JSON: {constant}")

        return json.loads(text, parse_constant=refuse)

    config = _config(tmp_path, steps=3, eval_every=0, method="opd", save_every=1)
    history = _trainer(tokenizer, config).train()
    assert all("fire/threshold" not in row for row in history)
    run = tmp_path / "run"
    rows = [strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/step"] for row in rows if row["train/step"]] == [1, 2, 3]
    states = [strict((run / name / "trainer_state.json").read_text()) for name in ("step-000001", "final")]
    assert all("history" not in state for state in states)
    assert len(json.dumps(states[0])) == pytest.approx(len(json.dumps(states[1])), rel=0.05)  # flat in the steps
    resumed = _trainer(
        tokenizer, _config(tmp_path, steps=3, eval_every=0, method="opd", resume_from=str(run / "step-000002"))
    )
    assert [row["train/step"] for row in resumed.history] == [1, 2]
    assert resumed.state.tokens == sum(row["train/tokens"] for row in history[:2])
