"""How each method of the kernel benchmark runs a workload: one adapter per method.

An adapter takes (workload, inputs) and returns `run`, a call of forward and backward that
returns the gradients of the student's hidden states and lm_head weight. Inputs (`x`): s_h [N, D_s]
and s_w [V, D_s] (the student's, with gradient), t_h [N, D_t] and t_w [V, D_t] (the teacher's),
targets [N], and for the update workload old log-probs and advantages [N].

    floor               the matrix products a memory-bounded method cannot avoid, nothing else
    reference | chunked | triton      fire-opd's backends (`ours`)
    reference_compiled  fire-opd's materialized reference under torch.compile
    liger, liger_ce     Liger-Kernel's chunked losses
    trl                 trl.kernels (TRL 1.16)
    cce                 Apple's Cut Cross-Entropy

Each peer is called the way its own library calls it (the comments say which call), and a
peer that has no call for a workload raises ValueError.
"""

from __future__ import annotations

from typing import Callable

VOCAB_CHUNK = 4096  # the floor's tile width: the same bounded tiles a memory-bounded method uses

Run = Callable[[], object]


def floor(workload: str, x: dict) -> Run:
    """Only the matrix products a memory-bounded implementation cannot avoid, on bounded tiles."""
    import torch

    s_h, s_w, t_h, t_w = x["s_h"].detach(), x["s_w"].detach(), x["t_h"], x["t_w"]
    vocab = s_w.shape[0]
    chunks = [slice(v, min(v + VOCAB_CHUNK, vocab)) for v in range(0, vocab, VOCAB_CHUNK)]
    teacher = workload in ("stats", "jsd", "kl", "jsd_loss")

    def run():
        grad_h = torch.zeros_like(s_h)
        grad_w = torch.empty_like(s_w)
        if workload != "update":
            for _ in range(2 if workload == "jsd" else 1):
                for c in chunks:
                    s_h @ s_w[c].t()
                    if teacher:
                        t_h @ t_w[c].t()
        for c in chunks:
            dz = s_h @ s_w[c].t()  # recompute (update: the one forward product)
            if workload in ("jsd", "kl", "jsd_loss"):
                t_h @ t_w[c].t()
            grad_h.addmm_(dz, s_w[c])
            torch.mm(dz.t(), s_h, out=grad_w[c])
        return grad_h, grad_w

    return run


def ours(backend: str, workload: str, x: dict) -> Run:
    """fire-opd's public calls with `backend` (reference, chunked or triton)."""
    import torch

    import fire_kernels
    from fire_kernels.fused_update import linear_log_prob_update

    s_h, s_w, t_h, t_w, y = x["s_h"], x["s_w"], x["t_h"], x["t_w"], x["targets"]
    if workload == "update":
        old, adv = x["old"], x["adv"]
        n = y.shape[0]
        if backend == "reference":  # the PPO loss on materialized log-softmax

            def materialized():
                logits = (s_h.float() @ s_w.float().t()).log_softmax(-1)
                lp = logits.gather(1, y[:, None]).squeeze(1)
                ratio = torch.exp(lp - old)
                loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
                return torch.autograd.grad(loss, (s_h, s_w))

            return materialized

        def ppo_grad(lp, rows):
            ratio = torch.exp(lp - old[rows])
            clipped = ratio.clamp(0.8, 1.2)
            a = adv[rows]
            pg = torch.maximum(-a * ratio, -a * clipped)
            return pg.sum() / n, torch.where(-a * ratio >= -a * clipped, -a * ratio, 0.0) / n

        return lambda: linear_log_prob_update(s_h.detach(), s_w.detach(), y, ppo_grad, backend=backend)
    if workload == "logprob":

        def log_prob():
            lp, ent = fire_kernels.token_stats(s_h, s_w, y, backend=backend)
            return torch.autograd.grad(lp.sum() + ent.sum(), (s_h, s_w))

        return log_prob
    if workload in ("kl", "jsd_loss"):
        divergence = {"kl": {"divergence": "reverse_kl"}, "jsd_loss": {"divergence": "jsd", "jsd_beta": 0.5}}[workload]

        def divergence_only():
            out = fire_kernels.teacher_student_stats(s_h, s_w, t_h, t_w, y, backend=backend, **divergence)
            return torch.autograd.grad(out.divergence.sum(), (s_h, s_w))

        return divergence_only
    loss = _stats_loss(workload, x, backend)  # stats, jsd
    return lambda: torch.autograd.grad(loss(), (s_h, s_w))


def _stats_loss(workload: str, x: dict, backend: str) -> Callable:
    """Both models' log-probs and entropies (+ the JSD for workload "jsd"), summed into a loss."""
    import fire_kernels

    divergence = "jsd" if workload == "jsd" else None

    def loss():
        out = fire_kernels.teacher_student_stats(
            x["s_h"], x["s_w"], x["t_h"], x["t_w"], x["targets"], divergence=divergence, backend=backend
        )
        total = out.student_log_prob.sum() + out.student_entropy.sum()
        return total + out.divergence.sum() if divergence else total

    return loss


def reference_compiled(workload: str, x: dict) -> Run:
    """fire-opd's materialized reference under torch.compile."""
    import torch

    import fire_kernels

    s_h, s_w, y = x["s_h"], x["s_w"], x["targets"]
    if workload == "logprob":
        compiled = torch.compile(lambda: fire_kernels.token_stats(s_h, s_w, y, backend="reference"))

        def run():
            lp, ent = compiled()
            return torch.autograd.grad(lp.sum() + ent.sum(), (s_h, s_w))

        return run
    if workload in ("stats", "jsd"):
        compiled_loss = torch.compile(_stats_loss(workload, x, "reference"))
        return lambda: torch.autograd.grad(compiled_loss(), (s_h, s_w))
    raise ValueError(f"reference_compiled has no {workload} workload")


def cce(workload: str, x: dict) -> Run:
    """Cut Cross-Entropy's linear_cross_entropy: the per-token -log p, no entropy."""
    import torch

    if workload != "logprob":
        raise ValueError(f"cce has no {workload} workload")
    from cut_cross_entropy import linear_cross_entropy

    s_h, s_w, y = x["s_h"], x["s_w"], x["targets"]

    def run():
        nll = linear_cross_entropy(s_h, s_w, y, reduction="none")
        return torch.autograd.grad(-nll.sum(), (s_h, s_w))

    return run


def liger(workload: str, x: dict) -> Run:
    """Liger's chunked losses: the selective log-prob of its PPO / GRPO losses, its fused linear JSD."""
    import torch

    s_h, s_w, t_h, t_w, y = x["s_h"], x["s_w"], x["t_h"], x["t_w"], x["targets"]
    if workload == "logprob":
        from liger_kernel.chunked_loss.fused_linear_ppo import (
            _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE,
            _ChunkedSelectiveLogProbFunction,
        )

        def selective_log_prob():  # its PPO / GRPO losses' call: no entropy
            lp = _ChunkedSelectiveLogProbFunction.apply(s_h, s_w, y, None, 1.0, _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE)
            return torch.autograd.grad(lp.sum(), (s_h, s_w))

        return selective_log_prob
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDLoss

    if workload in ("kl", "jsd_loss"):
        jsd = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0 if workload == "kl" else 0.5, compiled=False,
            chunk_size=1024,
        )  # fmt: skip
        return lambda: torch.autograd.grad(jsd(s_h, s_w, t_h, t_w, y), (s_h, s_w))  # the batch mean; no entropy
    if workload == "jsd":
        from liger_kernel.chunked_loss.fused_linear_ppo import (
            _ChunkedSelectiveLogProbFunction,
            _selective_logprob_forward,
        )

        jsd = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False, chunk_size=1024
        )

        def log_probs_and_jsd():  # the closest it comes: log-probs of both models and its JSD, no entropy
            lp = _ChunkedSelectiveLogProbFunction.apply(s_h, s_w, y, None, 1.0, 4096)
            with torch.no_grad():
                _selective_logprob_forward(t_h, t_w, y)
            loss = lp.sum() + jsd(s_h, s_w, t_h, t_w, y)
            return torch.autograd.grad(loss, (s_h, s_w))

        return log_probs_and_jsd
    raise ValueError(f"liger has no {workload} workload")


def liger_ce(workload: str, x: dict) -> Run:
    """Liger's fused linear cross-entropy: the summed -log p, no entropy."""
    import torch

    if workload != "logprob":
        raise ValueError(f"liger_ce has no {workload} workload")
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    s_h, s_w, y = x["s_h"], x["s_w"], x["targets"]

    def run():
        loss = LigerFusedLinearCrossEntropyFunction.apply(s_h, s_w, y, None, None, -100, 0.0, 0.0, "sum")
        loss = loss[0] if isinstance(loss, tuple) else loss
        return torch.autograd.grad(loss, (s_h, s_w))

    return run


def trl(workload: str, x: dict) -> Run:
    """trl.kernels as TRL 1.16 calls them: ChunkedLogProbFunction, ChunkedDivergenceFunction."""
    import torch

    s_h, s_w, t_h, t_w, y = x["s_h"], x["s_w"], x["t_h"], x["t_w"], x["targets"]
    if workload == "logprob":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def log_prob():  # TRL's own call (trl/trainer/utils.py), entropy with gradient
            lp, ent, *_ = ChunkedLogProbFunction.apply(
                s_h, s_w, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",)
            )
            return torch.autograd.grad(lp.sum() + ent.sum(), (s_h, s_w))

        return log_prob
    if workload in ("kl", "jsd_loss"):
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        beta = 1.0 if workload == "kl" else 0.5  # 1: KL(student || teacher); 0.5: the generalized JSD

        def divergence():  # TRL's entropy carries no gradient
            div, _entropy = ChunkedDivergenceFunction.apply(s_h, s_w, None, t_h, t_w, None, beta, 1.0)
            return torch.autograd.grad(div.sum(), (s_h, s_w))

        return divergence
    raise ValueError(f"trl has no {workload} workload")


ADAPTERS: dict[str, Callable[[str, dict], Run]] = {
    "floor": floor,
    "reference_compiled": reference_compiled,
    "cce": cce,
    "liger": liger,
    "liger_ce": liger_ce,
    "trl": trl,
}


def method_fn(method: str, workload: str, x: dict) -> Run:
    """`run` of `method` (a peer, the floor, or one of fire-opd's backends) on `workload`."""
    if method in ADAPTERS:
        return ADAPTERS[method](workload, x)
    return ours(method, workload, x)
