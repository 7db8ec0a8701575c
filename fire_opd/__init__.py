"""fire_opd: the FiRe-OPD algorithm (filter, then reweight) and a thin trainer.

Loss API for other trainers:
    fire_policy_loss(log_prob, old_log_prob, teacher_log_prob, student_entropy,
                     teacher_entropy, response_mask, fire=FireOptions(...)) -> (loss, metrics)
    fire_dense_loss(divergence, old_log_prob, ...)   the same filter and weights on the exact
                                                    per-token divergence (objective "full_vocab")
    fire_policy_loss_from_hidden(..., objective=)    either, from hidden states (no logits)

Layers, bottom to top (imports point down): fire_kernels -> parallel -> algorithm -> ops ->
train -> cli / integrations / demo.
"""

from fire_opd.algorithm.objectives import (
    clipped_surrogate,
    dense_coefficients,
    fire_dense_loss,
    fire_policy_loss,
    loss_normalizer,
)
from fire_opd.algorithm.options import LOSS_AGG_MODES, METHODS, OBJECTIVES, FireOptions
from fire_opd.algorithm.routing import route_rows, scatter_rows
from fire_opd.algorithm.selection import FireSelection, compute_fire_advantages
from fire_opd.ops.loss_from_hidden import FireOPDLoss, fire_policy_loss_from_hidden, response_token_stats

__all__ = [
    "FireOPDLoss",
    "FireOptions",
    "FireSelection",
    "LOSS_AGG_MODES",
    "METHODS",
    "OBJECTIVES",
    "clipped_surrogate",
    "compute_fire_advantages",
    "dense_coefficients",
    "fire_dense_loss",
    "fire_policy_loss",
    "fire_policy_loss_from_hidden",
    "loss_normalizer",
    "response_token_stats",
    "route_rows",
    "scatter_rows",
]
