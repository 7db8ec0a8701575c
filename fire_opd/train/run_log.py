"""Where a run's metrics go: `metrics.jsonl` (one JSON object per logged step), and the trackers
of `logging.report_to`: TensorBoard (output_dir/tensorboard) and Weights & Biases.

On resume from step s the log keeps exactly the rows of steps <= s (the rows a killed run wrote
after its checkpoint are dropped, rewritten atomically), TensorBoard purges the events after s,
and Weights & Biases continues the same run (its id is kept in output_dir/wandb-run-id), so every
step appears once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any, Optional, Sequence

from fire_opd.train.run_dir import METRICS_FILE

logger = logging.getLogger("fire_opd")
WANDB_ID_FILE = "wandb-run-id"


def check_report_to(report_to: Sequence[str]) -> None:
    """Fail before any model loads, in one line, when a tracker of `logging.report_to` cannot
    work: wandb not installed, or no W&B login for an online run (`wandb.init` would stop the
    run after the models load and the first evaluation). Raises ValueError."""
    if "wandb" not in report_to:
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ValueError("logging.report_to: wandb is not installed (pip install wandb); or leave it out")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = _wandb_host()
    if not _netrc_has(host):
        raise ValueError(
            f"logging.report_to: wandb has no login here (no WANDB_API_KEY, no entry for {host} in ~/.netrc): run "
            "`wandb login` or set WANDB_API_KEY; or set WANDB_MODE=offline to log under output_dir/wandb and "
            "`wandb sync` it later"
        )


def _wandb_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def _netrc_has(host: str) -> bool:
    """Whether the netrc file `wandb login` writes (NETRC, else ~/.netrc or ~/_netrc) holds `host`."""
    import netrc

    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else []
    candidates += [os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for path in candidates:
        if os.path.isfile(path):
            try:
                return netrc.netrc(path).authenticators(host) is not None
            except (OSError, netrc.NetrcParseError):
                return False
    return False


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunLog:
    def __init__(
        self, output_dir: str | Path, *, report_to: Sequence[str] = ("tensorboard",), config: Optional[dict] = None
    ):
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.report_to = list(report_to)
        self.config = config  # sent to Weights & Biases as the run's config
        self._writer: Optional[Any] = None  # TensorBoard's SummaryWriter, opened at the first row
        self._wandb: Optional[Any] = None  # the wandb run, opened at the first row
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
        with self.metrics_path.open("a") as f:  # strict JSON: a value that is not finite is written as null
            f.write(json.dumps({k: _finite_or_none(v) for k, v in metrics.items()}, allow_nan=False) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
        run = self._wandb_run()
        if run is not None:
            run.log(metrics, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def _tensorboard(self) -> Optional[Any]:
        if self._writer is None and "tensorboard" in self.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("logging.report_to: tensorboard is not installed (pip install tensorboard); skipped")
                self.report_to.remove("tensorboard")
                return None
            # purge_step: events a killed run wrote after the checkpoint we resumed from are hidden
            self._writer = SummaryWriter(
                str(self.output_dir / "tensorboard"), purge_step=self._start_step + 1 if self._start_step else None
            )
        return self._writer

    def _wandb_run(self) -> Optional[Any]:
        """The Weights & Biases run (project: $WANDB_PROJECT, else "fire-opd"; WANDB_MODE=offline
        writes it under output_dir/wandb to sync later), resumed under the id the run keeps."""
        if self._wandb is None and "wandb" in self.report_to:
            import wandb

            id_file = self.output_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "fire-opd"),
                name=self.output_dir.name,
                id=run_id,
                resume="allow",
                dir=str(self.output_dir),
                config=self.config,
            )
        return self._wandb
