"""The trainer and what a run needs around it: config, prompts, models, rollouts, scoring,
update, evaluation, checkpoints and metrics. `FireOPDTrainer` (trainer.py) is the loop."""
