"""Integrations with other trainers: `fire_opd.integrations.trl` (TRL's
DistillationTrainer) and `fire_opd.integrations.verl` (verl's distillation losses). Each imports
its trainer lazily and comes with an extra: `pip install fire-opd[trl]`, `fire-opd[verl]`.
Nothing else in the package imports them."""
