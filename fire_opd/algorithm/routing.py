"""Multi-teacher routing: each rollout is scored by the teacher its sample names.

routes = route_rows(["math", "rev", "math"], teachers=["math", "rev"])
# {"math": tensor([0, 2]), "rev": tensor([1])}
stats = scatter_rows({name: per_teacher_stats[name] for name in routes}, routes, batch_size=3)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import torch


def route_rows(
    teacher_keys: Sequence[Optional[str]], teachers: Iterable[str], *, default: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """Row indices per teacher name.

    Args:
        teacher_keys: one key per rollout (None falls back to `default`).
        teachers: the available teacher names.
        default: teacher for rows without a key; required if any key is None.
    Raises:
        KeyError naming the row and the missing key when a row names no available teacher.
    """
    names = list(teachers)
    if not names:
        raise ValueError("teachers must name at least one teacher")
    rows: dict[str, list[int]] = {name: [] for name in names}
    for i, key in enumerate(teacher_keys):
        key = default if key is None else key
        if key is None:
            raise KeyError(f"row {i} has no teacher key and no default teacher was given (teachers: {names})")
        if key not in rows:
            raise KeyError(f"row {i} names teacher {key!r}, which is not among the loaded teachers {names}")
        rows[key].append(i)
    return {name: torch.tensor(idx, dtype=torch.long) for name, idx in rows.items() if idx}


def scatter_rows(
    per_teacher: Mapping[str, Sequence[Any]], routes: Mapping[str, torch.Tensor], batch_size: int
) -> Sequence[torch.Tensor]:
    """Reassemble per-teacher row blocks (the same layout for every teacher) into full-batch
    tensors, of the blocks' own type when they are named tuples (e.g. `TeacherStudentStats`)."""
    if set(per_teacher) != set(routes):
        raise ValueError(f"per_teacher has teachers {sorted(per_teacher)} but routes has {sorted(routes)}")
    first = next(iter(per_teacher.values()))
    out = [torch.zeros((batch_size, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in first]
    for name, tensors in per_teacher.items():
        idx = routes[name].to(first[0].device)
        for buf, t in zip(out, tensors):
            buf[idx] = t
    return first._make(out) if hasattr(first, "_make") else tuple(out)
