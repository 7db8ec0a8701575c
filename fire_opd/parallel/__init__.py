"""Process groups, collectives, DDP / FSDP2 wrapping (distributed.py) and vocabulary-sharded
lm_heads (sharded_head.py). Bottom layer of fire_opd: imports only fire_kernels."""
