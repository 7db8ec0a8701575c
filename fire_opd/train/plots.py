"""Curves of training runs from their metrics.jsonl: one run (output_dir/curves.png) or several overlaid
(`fire-opd plot RUN_DIR...`). Needs matplotlib (the `demo` extra)."""

from __future__ import annotations

import json
from pathlib import Path

from fire_opd.train.run_dir import METRICS_FILE

# (metric, panel title): what a run's health is read from
PANELS = [
    ("train/reward", "reward (verifier, training rollouts)"),
    ("train/full_vocab_reverse_kl", "reverse KL to the teacher (nats/token)"),
    ("fire/keep_ratio", "rollouts kept by the filter"),
    ("train/response_length", "response length (tokens)"),
    ("eval/accuracy", "held-out accuracy (eval/accuracy)"),
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (ValueError naming the run when it has none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {METRICS_FILE}; expected the output_dir of a fire-opd training run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One panel per metric of PANELS, every run a line (labelled by its folder name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], PANELS):
        for name, rows in runs.items():
            points = [(row["train/step"], row[key]) for row in rows if row.get(key) is not None and "train/step" in row]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
