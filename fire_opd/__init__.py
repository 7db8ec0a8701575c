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

# The names below load on first use (PEP 562), so that the `fire-opd` command line starts without
# importing torch: `fire-opd --help` and a mistake in the inputs answer in a moment.
_EXPORTS = {
    "clipped_surrogate": "fire_opd.algorithm.objectives",
    "dense_coefficients": "fire_opd.algorithm.objectives",
    "fire_dense_loss": "fire_opd.algorithm.objectives",
    "fire_policy_loss": "fire_opd.algorithm.objectives",
    "loss_normalizer": "fire_opd.algorithm.objectives",
    "LOSS_AGG_MODES": "fire_opd.algorithm.options",
    "METHODS": "fire_opd.algorithm.options",
    "OBJECTIVES": "fire_opd.algorithm.options",
    "FireOptions": "fire_opd.algorithm.options",
    "route_rows": "fire_opd.algorithm.routing",
    "scatter_rows": "fire_opd.algorithm.routing",
    "FireSelection": "fire_opd.algorithm.selection",
    "compute_fire_advantages": "fire_opd.algorithm.selection",
    "FireOPDLoss": "fire_opd.ops.loss_from_hidden",
    "fire_policy_loss_from_hidden": "fire_opd.ops.loss_from_hidden",
    "response_token_stats": "fire_opd.ops.loss_from_hidden",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fire_opd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


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
