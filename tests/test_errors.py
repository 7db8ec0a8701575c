"""Every bad input of the kernels (their one input check, fire_kernels/_validation.py) raises the
documented error, naming the argument."""

from __future__ import annotations

import pytest
import torch

from fire_kernels import teacher_student_stats, token_stats


def _inputs(n=4, vocab=10, d_s=6, d_t=8):
    return (
        torch.randn(n, d_s),
        torch.randn(vocab, d_s),
        torch.randn(n, d_t),
        torch.randn(vocab, d_t),
        torch.randint(0, vocab, (n,)),
    )


def test_vocab_mismatch():
    s_h, s_w, t_h, _, y = _inputs()
    with pytest.raises(ValueError, match="vocab mismatch.*teacher_head.weight"):
        teacher_student_stats(s_h, s_w, t_h, torch.randn(11, 8), y)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_hidden_weight_d_mismatch(which):
    s_h, s_w, t_h, t_w, y = _inputs()
    if which == "student":
        with pytest.raises(ValueError, match=r"student_hidden.*head\.weight"):
            teacher_student_stats(s_h, torch.randn(10, 5), t_h, t_w, y)
    else:
        with pytest.raises(ValueError, match=r"teacher_hidden.*teacher_head\.weight"):
            teacher_student_stats(s_h, s_w, t_h, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match="hidden.*weight"):
        token_stats(s_h, torch.randn(10, 5), y)


@pytest.mark.parametrize("bad", [10, -1, 12345])
def test_targets_out_of_range(bad):
    s_h, s_w, t_h, t_w, y = _inputs()
    y[1] = bad
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        teacher_student_stats(s_h, s_w, t_h, t_w, y)
    with pytest.raises(ValueError, match="targets"):
        token_stats(s_h, s_w, y)


def test_custom_ignore_index_is_accepted():
    s_h, s_w, _, _, y = _inputs()
    y[0] = -1
    lp, _ = token_stats(s_h, s_w, y, ignore_index=-1)
    assert lp[0] == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64])
def test_unsupported_hidden_dtype(dtype):
    s_h, s_w, _, _, y = _inputs()
    with pytest.raises(TypeError, match="hidden has dtype"):
        token_stats(s_h.to(dtype), s_w, y)


def test_float_targets_and_mixed_dtypes():
    s_h, s_w, _, _, y = _inputs()
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        token_stats(s_h, s_w, y.float())
    with pytest.raises(TypeError, match=r"hidden .* and head\.weight .* must share a dtype"):
        token_stats(s_h, s_w.half(), y)


def test_float64_rejected_by_triton():
    s_h, s_w, _, _, y = _inputs()
    with pytest.raises(TypeError, match="float64"):
        token_stats(s_h.double(), s_w.double(), y, backend="triton")


def test_mixed_devices():
    s_h, s_w, t_h, t_w, y = _inputs()
    with pytest.raises(ValueError, match="one device.*teacher_hidden on meta"):
        teacher_student_stats(s_h, s_w, t_h.to("meta"), t_w, y)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"divergence": "kl"}, "divergence"),
        ({"divergence": "jsd", "jsd_beta": 1.5}, "jsd_beta"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_options(kwargs, match):
    s_h, s_w, t_h, t_w, y = _inputs()
    with pytest.raises(ValueError, match=match):
        teacher_student_stats(s_h, s_w, t_h, t_w, y, **kwargs)


def test_shape_errors():
    s_h, s_w, t_h, t_w, y = _inputs()
    with pytest.raises(ValueError, match="targets must have shape \\[4\\]"):
        token_stats(s_h, s_w, y[:3])
    with pytest.raises(ValueError, match="student_hidden must be 2-D"):
        teacher_student_stats(s_h[None], s_w, t_h, t_w, y)
    with pytest.raises(ValueError, match="teacher_hidden has 3 tokens"):
        teacher_student_stats(s_h, s_w, t_h[:3], t_w, y)
    with pytest.raises(TypeError, match=r"head must be a \[V, D\] torch.Tensor or a fire_kernels.LMHead"):
        token_stats(s_h, s_w.numpy(), y)
    with pytest.raises(ValueError, match="divergence needs a teacher"):
        from fire_kernels import LMHead
        from fire_kernels._validation import validate_stats_inputs

        validate_stats_inputs(s_h, LMHead(s_w), y, divergence="reverse_kl")
