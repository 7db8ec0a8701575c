"""fire_opd: the FiRe-OPD algorithm (filter, then reweight) and a thin trainer.

Loss API for other trainers:
    fire_policy_loss(log_prob, old_log_prob, teacher_log_prob, student_entropy,
                     teacher_entropy, response_mask, method="fire", ...) -> (loss, metrics)
    fire_dense_loss(divergence, old_log_prob, ...)   the same filter and weights on the exact
                                                    per-token divergence (objective "full_vocab")
    fire_policy_loss_from_hidden(..., objective=)    either, from hidden states (no logits)
"""

from .loss_from_hidden import FireOPDLoss, fire_policy_loss_from_hidden, response_token_stats
from .loss import (
    LOSS_AGG_MODES, METHODS, OBJECTIVES, FireAdvantages, clipped_surrogate, compute_fire_advantages,
    dense_coefficients, fire_dense_loss, fire_policy_loss, loss_normalizer,
)
from .routing import route_rows, scatter_rows

__all__ = [
    "FireAdvantages", "FireOPDLoss", "LOSS_AGG_MODES", "METHODS", "OBJECTIVES", "clipped_surrogate",
    "compute_fire_advantages", "dense_coefficients", "fire_dense_loss", "fire_policy_loss",
    "fire_policy_loss_from_hidden", "loss_normalizer", "response_token_stats", "route_rows", "scatter_rows",
]
