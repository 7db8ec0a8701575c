"""Mixed precision: a bf16 student trains through float32 master weights (fire_opd/train/optim.py)."""

from __future__ import annotations

import json

import pytest
import torch

from fire_opd.train.optim import MasterWeightAdamW, build_optimizer
from tests.test_trainer import _config, _trainer, tokenizer  # noqa: F401  (the fixture)


def _steps(optimizer, params, grads):
    for grad in grads:
        for p, g in zip(params, grad):
            p.grad = g.to(p.dtype)
        optimizer.step()


def test_float32_parameters_step_exactly_as_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 5, generator=gen), torch.randn(3, generator=gen)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    options = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
    _steps(MasterWeightAdamW(ours, **options), ours, grads)
    _steps(torch.optim.AdamW(theirs, **options), theirs, grads)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_bf16_weights_take_updates_below_their_rounding_step():
    """A bf16 weight of 1.0 has a rounding step of 2^-7: AdamW's steps of lr = 1e-3 are lost in
    place, while the float32 master accumulates them and the weight follows it."""
    grads = [[torch.ones(4)] for _ in range(20)]
    in_place = [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))]
    _steps(torch.optim.AdamW(in_place, lr=1e-3, weight_decay=0.0), in_place, grads)
    assert torch.equal(in_place[0], torch.ones(4, dtype=torch.bfloat16))  # what users got before

    mastered = [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))]
    optimizer = MasterWeightAdamW(mastered, lr=1e-3, weight_decay=0.0)
    _steps(optimizer, mastered, grads)
    master = optimizer.state[mastered[0]]["master"]
    reference = [torch.nn.Parameter(torch.ones(4))]
    _steps(torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.0), reference, grads)
    assert master.dtype == torch.float32 and torch.equal(master, reference[0].detach())  # the float32 run exactly
    assert mastered[0].dtype == torch.bfloat16
    assert torch.equal(mastered[0].detach(), master.to(torch.bfloat16))  # rounded to nearest
    assert float(mastered[0].detach()[0]) < 1.0


def test_the_master_weights_survive_a_state_dict_round_trip():
    """torch casts loaded optimizer state to the parameter's dtype; the master and the moments
    must come back in float32, bit for bit."""
    params = [torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))]
    optimizer = MasterWeightAdamW(params, lr=1e-3)
    _steps(optimizer, params, [[torch.randn(6, 4)] for _ in range(3)])
    saved = optimizer.state_dict()
    fresh = MasterWeightAdamW(params, lr=1e-3)
    fresh.load_state_dict(saved)
    for key in ("master", "exp_avg", "exp_avg_sq"):
        value = fresh.state[params[0]][key]
        assert value.dtype == torch.float32 and torch.equal(value, optimizer.state[params[0]][key]), key


def test_the_optimizer_follows_the_trainable_dtype(caplog):
    model = torch.nn.Linear(4, 4)
    optim = _config_optim()
    assert type(build_optimizer(model, optim)) is torch.optim.AdamW  # float32: torch's own, unchanged
    model.to(torch.bfloat16)
    assert isinstance(build_optimizer(model, optim), MasterWeightAdamW)
    with caplog.at_level("WARNING", logger="fire_opd"):
        assert type(build_optimizer(model, optim, master_weights=False)) is torch.optim.AdamW
    assert "optim.master_weights: false with bfloat16 trainable weights" in caplog.text


def _config_optim():
    from fire_opd.train.config import OptimConfig

    return OptimConfig(lr=1e-5)


def _moved(before: dict, student) -> tuple[float, set]:
    """(the share of weights that changed, the names of parameters none of whose weights changed)."""
    changed = total = 0
    still = set()
    for name, p in student.named_parameters():
        diff = p.detach() != before[name]
        changed += int(diff.sum())
        total += diff.numel()
        if not diff.any():
            still.add(name)
    return changed / total, still


def test_a_bf16_full_fine_tune_moves_the_weights_as_float32_does(tmp_path, tokenizer):  # noqa: F811
    """The README's bf16 full fine-tune at lr 1e-5: the trained weights (the float32 masters the
    bf16 weights are rounded from) all move, as in float32, and the loss follows the float32
    run's. In place, 11 % of the weights moved after 20 steps, and no RMSNorm weight."""
    moved, losses = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = _config(tmp_path / dtype, steps=8, eval_every=0, dtype=dtype, lr=1e-5, objective="full_vocab")
        trainer = _trainer(tokenizer, config)
        before = {name: p.detach().float().clone() for name, p in trainer.student.named_parameters()}
        history = trainer.train()
        assert all(row["train/step_skipped"] == 0.0 for row in history)
        losses[dtype] = [row["train/loss"] for row in history]
        trained = trainer.student
        if dtype == "bfloat16":
            assert {p.dtype for p in trained.parameters()} == {torch.bfloat16}  # the dtype asked for
            masters = {}
            for name, p in trained.named_parameters():
                master = trainer.optimizer.state[p]["master"]
                assert torch.equal(p.detach(), master.to(torch.bfloat16)), name  # rounded to nearest
                masters[name] = master
            trained = _Named(masters)
        moved[dtype] = _moved(before, trained)
    share, still = moved["bfloat16"]
    assert moved["float32"][0] > 0.9, moved
    assert share >= 0.95 * moved["float32"][0], moved
    assert not still, f"bf16 parameters that never moved: {sorted(still)[:4]}"
    for a, b in zip(losses["float32"], losses["bfloat16"]):
        assert abs(a - b) <= 0.05 * abs(a) + 1e-3, (losses["float32"], losses["bfloat16"])


class _Named:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def named_parameters(self):
        return iter(self.tensors.items())


def test_a_bf16_run_resumes_bit_exactly_and_saves_bf16(tmp_path, tokenizer):  # noqa: F811
    overrides = {"steps": 4, "dtype": "bfloat16", "lr": 1e-4, "objective": "full_vocab", "eval_every": 0}
    full = _trainer(tokenizer, _config(tmp_path / "a", **overrides))
    full.train()
    first = _trainer(tokenizer, _config(tmp_path / "b", **overrides))
    first.train(until_step=2)
    ckpt = first.save_checkpoint(tmp_path / "b" / "interrupted")
    raw = (ckpt / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    resumed = _trainer(tokenizer, _config(tmp_path / "b", resume_from=str(ckpt), **overrides), student_seed=7)
    resumed.train()
    for (name, p), q in zip(full.student.named_parameters(), resumed.student.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(full.student.parameters(), resumed.student.parameters()):
        assert torch.equal(full.optimizer.state[p]["master"], resumed.optimizer.state[q]["master"])


@pytest.mark.parametrize("value", [True, False])
def test_master_weights_is_a_config_field(value):
    from fire_opd.train.config import TrainConfig

    assert TrainConfig.from_dict({"optim": {"master_weights": value}}).optim.master_weights is value
