"""Where the benchmarks write their figures: benchmarks/results/<name>-<device>-<date>.{json,md}."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path


def device_label(cuda: bool = False) -> str:
    """The GPU's name, or cpu-<arch>-<cores>cores."""
    if cuda:
        import torch

        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def write_results(out: Path, name: str, title: str, rows, table: str, device: str) -> Path:
    """rows as JSON and `table` as Markdown under `title`, side by side; returns the path stem."""
    stem = out / f"{name}-{device}-{_dt.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    stem.with_suffix(".md").write_text(f"## {title}: {device}\n\n{table}\n")
    return stem
