"""Where the benchmarks write their figures: benchmarks/results/<name>-<device>-<date>.{json,md},
each stamped with the code it measured (`provenance`), so that a figure quoted later can say
whether it is still the final code's."""

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


def cpu() -> str:
    """The CPU, as far as CPU results depend on it: its model name, family and model (two "AMD
    EPYC" machines of different generations share the name) and the instruction set torch's CPU
    kernels dispatch to (AVX2, AVX512, ...), which decides how their float sums round. Fixed-seed
    fingerprints and the demo's rows differ across CPUs with the same code, and timings more so."""
    import torch

    name, generation = platform.processor() or platform.machine(), ""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:  # not Linux
        first = ""
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    if fields.get("model name"):
        name = fields["model name"]
    if fields.get("cpu family"):
        generation = f", family {fields['cpu family']} model {fields.get('model', '?')}"
    return f"{name}{generation}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"


def provenance() -> dict:
    """What a result measured: the commit ("+dirty" when fire_opd / fire_kernels differ from it;
    "unknown" outside a git checkout, as on a lent GPU machine), the hash of the package's source
    (which says it without git), the package, torch and Python versions, the CPU (`cpu`) and the
    UTC time."""
    import torch

    from fire_opd.demo.provenance import stamp

    return {**stamp(), "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu()}


def provenance_line(stamp: dict) -> str:
    """One Markdown line for `provenance()`."""
    return (
        f"Measured on commit {stamp['commit']} (source hash {stamp['code_hash']}), torch {stamp['torch']}, "
        + (f"CPU {stamp['cpu']}, " if "cpu" in stamp else "")
        + f"{stamp['date']}."
    )


def result_file(stem: Path, suffix: str) -> Path:
    """`stem` + `suffix` (".json", ".md"): a stem may hold dots (a release number such as 3.13),
    which `Path.with_suffix` would take for a suffix and cut."""
    return stem.with_name(stem.name + suffix)


def write_results(out: Path, name: str, title: str, rows, table: str, device: str) -> Path:
    """rows as JSON (with their provenance) and `table` as Markdown under `title`, side by side;
    returns the path stem."""
    stem = out / f"{name}-{device}-{_dt.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    stamp = provenance()
    result_file(stem, ".json").write_text(json.dumps({"provenance": stamp, "rows": rows}, indent=1))
    result_file(stem, ".md").write_text(f"## {title}: {device}\n\n{provenance_line(stamp)}\n\n{table}\n")
    return stem
