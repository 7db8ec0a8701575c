"""Padded vocabularies: heads with rows past the tokenizer's vocabulary (different numbers on
either side) give exactly the statistics, losses and gradients of the heads cut to it, on every
backend and in the fused updates; the padding rows get zero gradient and are never copied."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_close_grad, assert_close_output, make_problem, run_in_gloo_group

from fire_kernels import LMHead, teacher_student_stats, token_stats
from fire_kernels.fused_update import linear_divergence_update, linear_log_prob_update

BACKENDS = ["reference", "chunked", "triton"]
V = 13


def _padded(weight: torch.Tensor, extra: int, seed: int) -> torch.Tensor:
    """`weight` with `extra` rows after it whose logits would dominate if they took part."""
    gen = torch.Generator().manual_seed(seed)
    padding = torch.randn(extra, weight.shape[1], generator=gen, dtype=torch.float64).to(weight.dtype) * 50
    return torch.cat([weight, padding]).requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", [None, "reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("student_extra,teacher_extra", [(3, 6), (0, 5), (4, 0)])
def test_padded_heads_equal_the_heads_cut_to_the_vocabulary(backend, divergence, student_extra, teacher_extra):
    s_h, s_w, t_h, t_w, y = make_problem(9, V, 8, 6, torch.float32, seed=1)
    s_h.requires_grad_()
    s_pad, t_pad = _padded(s_w, student_extra, 2), _padded(t_w, teacher_extra, 3)
    bias = torch.randn(V + student_extra, generator=torch.Generator().manual_seed(4)).requires_grad_()
    kwargs = dict(divergence=divergence, backend=backend, jsd_beta=0.3, temperature=0.8)
    got = teacher_student_stats(s_h, LMHead(s_pad, bias), t_h, t_pad, y, vocab_size=V, **kwargs)
    s_cut, bias_cut = s_w.detach().clone().requires_grad_(), bias.detach()[:V].clone().requires_grad_()
    h_cut = s_h.detach().clone().requires_grad_()
    want = teacher_student_stats(h_cut, LMHead(s_cut, bias_cut), t_h, t_w, y, **kwargs)
    for name, a, b in zip(got._fields, got, want):
        if b is not None:
            assert_close_output(a, b, torch.float32, name)

    def loss(out):
        return (
            out.student_log_prob.sum() + 0.3 * out.student_entropy.sum() + (out.divergence.sum() if divergence else 0.0)
        )

    loss(got).backward()
    loss(want).backward()
    assert_close_grad(s_h.grad, h_cut.grad, torch.float32, "dh")
    assert_close_grad(s_pad.grad[:V], s_cut.grad, torch.float32, "dW")
    assert_close_grad(bias.grad[:V], bias_cut.grad, torch.float32, "db")
    assert torch.all(s_pad.grad[V:] == 0) and torch.all(bias.grad[V:] == 0)  # padding gets no gradient


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_fused_updates_with_padded_heads(backend):
    s_h, s_w, t_h, t_w, y = make_problem(10, V, 8, 6, torch.float32, seed=5)
    s_pad, t_pad = _padded(s_w, 3, 6).detach(), _padded(t_w, 7, 7).detach()
    coef = torch.rand(10, generator=torch.Generator().manual_seed(8))
    for kind in ("reverse_kl", "jsd"):
        got = linear_divergence_update(s_h, s_pad, t_h, t_pad, y, coef, divergence=kind, backend=backend, vocab_size=V)
        want = linear_divergence_update(s_h, s_w, t_h, t_w, y, coef, divergence=kind, backend=backend)
        assert_close_output(got.divergence, want.divergence, torch.float32, f"{kind} D")
        assert got.grad_weight.shape == s_pad.shape and torch.all(got.grad_weight[V:] == 0)
        assert_close_grad(got.grad_weight[:V], want.grad_weight, torch.float32, f"{kind} dW")
        assert_close_grad(got.grad_hidden, want.grad_hidden, torch.float32, f"{kind} dh")

    def grad_fn(lp, rows):
        return lp.sum(), torch.ones_like(lp)

    got = linear_log_prob_update(s_h, s_pad, y, grad_fn, backend=backend, vocab_size=V)
    want = linear_log_prob_update(s_h, s_w, y, grad_fn, backend=backend)
    assert_close_output(got.log_prob, want.log_prob, torch.float32, "log_prob")
    assert got.grad_weight.shape == s_pad.shape and torch.all(got.grad_weight[V:] == 0)
    assert_close_grad(got.grad_weight[:V], want.grad_weight, torch.float32, "dW")


def test_padded_vocabulary_errors_name_the_argument():
    s_h, s_w, t_h, t_w, y = make_problem(4, V, 8, 6, torch.float32, seed=9)
    s_pad = _padded(s_w, 3, 1).detach()
    with pytest.raises(ValueError, match="pass vocab_size=<the tokenizer's size>"):
        teacher_student_stats(s_h, s_pad, t_h, t_w, y)
    for bad in (0, -1, 2.5, True, "13"):
        with pytest.raises(ValueError, match="vocab_size must be a positive int"):
            token_stats(s_h, s_pad, y, vocab_size=bad)
    with pytest.raises(ValueError, match="vocab_size 17 exceeds the 16 rows"):
        token_stats(s_h, s_pad, y, vocab_size=17)
    with pytest.raises(ValueError, match="targets"):
        token_stats(s_h, s_pad, torch.full_like(y, V + 1), vocab_size=V)  # an id in the padding


def test_padding_is_a_view_not_a_copy():
    from fire_kernels.vocab_parallel import valid_rows

    weight, bias = torch.randn(20, 4), torch.randn(20)
    cut_w, cut_b = valid_rows(V, None, weight, bias)
    assert cut_w.data_ptr() == weight.data_ptr() and cut_w.shape == (V, 4) and cut_b.shape == (V,)


def _pad_head(model, rows: int, seed: int):
    """The model with its embeddings resized to `rows` (as checkpoints are padded), the new
    lm_head rows large enough to take most of the probability if they took part."""
    import copy

    padded = copy.deepcopy(model)
    old = padded.get_output_embeddings().weight.shape[0]
    padded.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        head = padded.get_output_embeddings().weight
        head[old:] = torch.randn(rows - old, head.shape[1], generator=gen) * 20
    return padded


@pytest.mark.parametrize("objective", ["full_vocab", "sampled"])
def test_a_padded_pair_trains_as_the_unpadded_pair(tmp_path, objective):
    """Student padded to 24 rows and teacher to 32 for an 18-token tokenizer: the run equals the
    unpadded pair's (rollouts, statistics, losses, weights), the padding is never sampled and
    its rows never move."""
    from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
    from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
    from fire_opd.train.config import TrainConfig
    from fire_opd.train.trainer import FireOPDTrainer

    tokenizer = build_char_tokenizer(TASK_ALPHABET)
    vocab = len(tokenizer)

    def model(seed):
        return tiny_llama(vocab, 32, 1, 2, seed=seed, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)

    student, teacher = model(0), model(1)
    runs = {}
    for name, (s, t) in {
        "plain": (student, teacher),
        "padded": (_pad_head(student, 24, 2), _pad_head(teacher, 32, 3)),
    }.items():
        config = TrainConfig.from_dict(
            {"output_dir": str(tmp_path / name), "optim.steps": 3, "sampling.prompts_per_step": 4,
             "sampling.samples_per_prompt": 2, "sampling.max_new_tokens": 6, "optim.lr": 1e-3, "eval.every": 0,
             "logging.progress": False, "logging.report_to": [], "loss.objective": objective,
             "sampling.top_p": 1e-6}  # nucleus of one token: sampling draws the same from 18 or 24 columns
        )  # fmt: skip
        trainer = FireOPDTrainer(
            config, student=s, teachers={"arith": t}, tokenizer=tokenizer,
            train_problems=sample_problems(["arith"], 16, seed=1, split="train"),
        )  # fmt: skip
        assert trainer.vocab_size == (None if name == "plain" else vocab)
        before = trainer.student.get_output_embeddings().weight.detach().clone()
        runs[name] = (trainer.train(), trainer.student, before)
    (plain, plain_student, _), (padded, padded_student, before) = runs["plain"], runs["padded"]
    for a, b in zip(plain, padded):
        for key in ("train/loss", "train/full_vocab_reverse_kl", "train/response_length", "fire/keep_ratio"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    head = padded_student.get_output_embeddings().weight.detach()
    torch.testing.assert_close(
        head[:vocab], plain_student.get_output_embeddings().weight.detach(), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(head[vocab:], before[vocab:])  # no gradient, no AdamW step


def test_generation_never_samples_padding_rows():
    from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
    from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
    from fire_opd.train.rollouts import generate_rollouts

    tokenizer = build_char_tokenizer(TASK_ALPHABET)
    model = tiny_llama(len(tokenizer), 32, 1, 2, seed=0, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    padded = _pad_head(model, 40, 5)  # padding rows that would win almost every draw
    prompts = [p.prompt for p in sample_problems(["arith"], 16, seed=3, split="train")]
    torch.manual_seed(0)
    rollouts = generate_rollouts(padded, tokenizer, prompts, max_new_tokens=8, temperature=1.0)
    assert int(rollouts.response_ids.max()) < len(tokenizer)


def _sharded_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    from fire_opd.parallel.sharded_head import shard_layout

    s_h, s_w, t_h, t_w, y = make_problem(11, V, 8, 6, torch.float32, seed=3)
    s_pad, t_pad = _padded(s_w, 3, 4).detach(), _padded(t_w, 8, 5).detach()
    (s_lo, s_hi), (t_lo, t_hi) = (shard_layout(w.shape[0], world, V)[rank] for w in (s_pad, t_pad))
    assert s_lo == t_lo  # the heads' shards start at one row whatever their padding
    want = teacher_student_stats(s_h, s_w, t_h, t_w, y, divergence="reverse_kl", backend="reference")
    for backend in ("chunked", "triton"):
        mine = s_pad[s_lo:s_hi].clone().requires_grad_()
        got = teacher_student_stats(
            s_h, mine, t_h, t_pad[t_lo:t_hi], y, divergence="reverse_kl", backend=backend,
            vocab_process_group=dist.group.WORLD, vocab_size=V,
        )  # fmt: skip
        for name, a, b in zip(got._fields, got, want):
            assert_close_output(a, b, torch.float32, f"{backend} {name}")
        (got.student_log_prob.sum() + got.divergence.sum()).backward()
        whole = s_w.clone().requires_grad_()
        ref = teacher_student_stats(s_h, whole, t_h, t_w, y, divergence="reverse_kl", backend="reference")
        (ref.student_log_prob.sum() + ref.divergence.sum()).backward()
        valid = max(0, min(V, s_hi) - s_lo)
        assert_close_grad(mine.grad[:valid], whole.grad[s_lo : s_lo + valid], torch.float32, f"{backend} dW")
        assert torch.all(mine.grad[valid:] == 0)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_shards_of_padded_heads(world):
    """parallel.vocab with padded heads: the padding goes to the last process's shard, every shard
    starts at one row in both heads, and the statistics and gradients are the unpadded ones."""
    run_in_gloo_group(_sharded_worker, world)


def test_a_head_short_of_the_tokenizer_is_refused():
    from fire_opd.demo.tasks import TASK_ALPHABET
    from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
    from fire_opd.train.models import shared_vocabulary

    tokenizer = build_char_tokenizer(TASK_ALPHABET)
    ids = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    student, short = tiny_llama(len(tokenizer), 16, 1, 2, seed=0, **ids), tiny_llama(12, 16, 1, 2, seed=1, **ids)
    assert shared_vocabulary(student, {"a": student}, tokenizer) is None  # exact heads: every row, as before
    with pytest.raises(ValueError, match=r"teacher 'a' has 12 lm_head rows but the tokenizer has 18 tokens"):
        shared_vocabulary(student, {"a": short}, tokenizer)
