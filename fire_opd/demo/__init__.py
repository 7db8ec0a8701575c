"""The built-in demo: tasks, tiny models and their assets, settings and recipes, the study.

Top layer: imports train and below; nothing imports it except the CLI. `asset(name)` gives the
path of a shipped tiny model or tokenizer wherever the package is installed.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def asset(name: str) -> str:
    """Absolute path of a shipped demo asset folder, e.g. `asset("teacher_arith")`, `asset("tokenizer")`,
    `asset("steps/student_init")` (made by `python -m fire_opd.demo.build_assets`)."""
    path = ASSETS / name
    if not path.is_dir():
        shipped = sorted(p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("config.json"))
        raise FileNotFoundError(f"no demo asset {name!r} under {ASSETS}; models: {[s[:-12] for s in shipped]}")
    return str(path)
