"""The optimizer: AdamW, with float32 master weights for a bf16 / fp16 student.

Why master weights. AdamW's update of one weight is lr * m / (sqrt(v) + eps), about lr in size.
A bf16 weight w has 8 significant bits, so it moves only when the update exceeds half its
rounding step, |w| * 2^-8: at lr 1e-5 every weight larger than about 5e-3 in magnitude never
moves (a RMSNorm weight near 1 needs lr > 4e-3). Updating bf16 weights in place therefore loses
most of a fine-tune silently (measured on the benchmark student: 11 % of the weights moved after
20 steps, against 99.9 % in float32).

`MasterWeightAdamW` does what Megatron-LM, DeepSpeed and Apex's FusedAdam(master_weights) do:
the model keeps its bf16 weights (generation, scoring and the loss run in bf16 as before), and
the optimizer keeps a float32 copy of each low-precision weight with float32 moments; a step
updates the float32 copy with the gradient cast up and writes it back rounded to nearest. The
copy is optimizer state (`state[p]["master"]`), so a checkpoint's optimizer.pt holds it and a
resume continues bit-exactly, while the checkpoint's model files keep the dtype the user asked
for. Memory per trained weight: 2 (bf16) + 2 (grad) + 4 (master) + 8 (moments) = 16 bytes, the
same as a float32 student (4 + 4 + 8) and twice pure bf16 (2 + 2 + 2 + 2, moments in bf16);
`benchmarks/bench_train.py --precision` measures it.
"""

from __future__ import annotations

import logging
from typing import Iterable, cast

import torch
from torch.optim.adamw import adamw

logger = logging.getLogger("fire_opd")

#: state entries kept in float32 whatever the parameter's dtype (torch's load_state_dict would
#: cast them to the parameter's dtype, rounding the master weights to bf16)
FLOAT32_STATE = ("master", "exp_avg", "exp_avg_sq")
#: elements per foreach call: bounds the float32 copies of the gradients that a step makes
_BUCKET_ELEMENTS = 1 << 24  # 64 MiB of float32 gradient at a time


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's arithmetic) on float32 master copies of
    low-precision parameters; float32 parameters are their own master (then it is torch.optim.AdamW
    step for step).

    Args:
        params: the parameters (or parameter groups) to train, any floating dtype.
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._float32_state: list[dict] = []
        self.register_load_state_dict_pre_hook(_keep_float32_state)
        self.register_load_state_dict_post_hook(_restore_float32_state)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            trained = [p for p in group["params"] if p.grad is not None]
            bucket: list[torch.Tensor] = []
            size = 0
            for p in trained:
                bucket.append(p)
                size += p.numel()
                if size >= _BUCKET_ELEMENTS:
                    self._update(bucket, group)
                    bucket, size = [], 0
            if bucket:
                self._update(bucket, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        masters, grads, exp_avgs, exp_avg_sqs, steps, low = [], [], [], [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            if p.dtype != torch.float32 and "master" not in state:  # also a resume of a pure-bf16 checkpoint
                state["master"] = p.detach().float()
            master, grad = state.get("master", p), p.grad
            assert grad is not None  # `step` passes trained parameters only
            masters.append(master)
            grads.append(grad if grad.dtype == torch.float32 else grad.float())
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            if master is not p:
                low.append((p, master))
        beta1, beta2 = group["betas"]
        adamw(
            masters, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )  # fmt: skip
        if low:  # the weights the model computes with: the masters rounded to nearest
            torch._foreach_copy_([p for p, _ in low], [m for _, m in low])


def _keep_float32_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Before torch casts the loaded state to each parameter's dtype: keep the float32 entries, in
    the order of the saved parameter groups (the order `load_state_dict` pairs them with ours; the
    keys may be indices or, from torch.distributed.checkpoint, parameter names)."""
    state = state_dict.get("state", {})
    cast(MasterWeightAdamW, optimizer)._float32_state = [
        {key: value for key, value in state.get(param_id, {}).items() if key in FLOAT32_STATE}
        for group in state_dict["param_groups"]
        for param_id in group["params"]
    ]


def _restore_float32_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`: the float32 entries as they were saved, on each parameter's device."""
    ours = cast(MasterWeightAdamW, optimizer)
    saved, ours._float32_state = ours._float32_state, []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for entries, p in zip(saved, params):
        for key, value in entries.items():
            optimizer.state[p][key] = value.to(device=p.device, dtype=torch.float32)


def build_optimizer(student: torch.nn.Module, optim, *, master_weights: bool = True) -> torch.optim.Optimizer:
    """The optimizer of a run (`optim`: an OptimConfig) over the student's trainable parameters
    (a LoRA student: its adapters). Float32 parameters get torch.optim.AdamW; any bf16 / fp16
    trainable parameter gets `MasterWeightAdamW`, or with `master_weights=False` torch's AdamW
    in place, with a warning that small updates are lost."""
    params = [p for p in student.parameters() if p.requires_grad]
    options = {"lr": optim.lr, "betas": optim.adam_betas, "weight_decay": optim.weight_decay}
    low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype != torch.float32})
    if not low:
        return torch.optim.AdamW(params, **options)
    if master_weights:
        return MasterWeightAdamW(params, **options)
    logger.warning(
        "optim.master_weights: false with %s trainable weights: AdamW updates them in place, and every update "
        "smaller than a weight's rounding step is lost (at lr %g most weights never move); set "
        "optim.master_weights: true (the default) or train LoRA adapters",
        "/".join(low),
        optim.lr,
    )
    return torch.optim.AdamW(params, **options)
