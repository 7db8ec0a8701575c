"""Where a run's metrics go: `metrics.jsonl` (one JSON object per logged step) and TensorBoard.

On resume from step s the log keeps exactly the rows of steps <= s (the rows a killed run wrote
after its checkpoint are dropped, rewritten atomically) and TensorBoard purges the events after
s, so every step appears once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from fire_opd.train.checkpoint import METRICS_FILE


class RunLog:
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.tensorboard = tensorboard
        self._writer: Optional[Any] = None
        self._start_step = 0

    def start(self, step: int) -> None:
        """Open the log of a run that continues after `step` (0 for a new run)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._start_step = step
        if self.metrics_path.exists():
            kept = [
                line
                for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("train/step", 0) <= step
            ]
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.metrics_path)

    def write(self, step: int, metrics: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _tensorboard(self) -> Optional[Any]:
        if self._writer is None and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only
                self.tensorboard = False
                return None
            # purge_step: events a killed run wrote after the checkpoint we resumed from are hidden
            self._writer = SummaryWriter(
                str(self.output_dir / "tensorboard"), purge_step=self._start_step + 1 if self._start_step else None
            )
        return self._writer
