"""Hidden states to statistics and losses, on fire_kernels: a model's head and final hidden
states (heads.py), per-token statistics and the FiRe-OPD losses without logits (loss_from_hidden.py)."""
