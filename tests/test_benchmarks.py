"""The benchmark scripts' own contracts that their `--quick` smoke runs in `make test` cannot see:
the default run (`make bench`) has a plan for every workload, and every result file says which
code it measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_kernels  # noqa: E402
from _results import provenance_line, write_results  # noqa: E402

from fire_opd.demo.provenance import code_hash  # noqa: E402


def test_the_default_run_has_shapes_and_a_product_count_for_every_workload():
    """`make bench` runs every workload on DEFAULT_PLAN's shapes (--quick runs "tiny" instead, so
    a workload missing here only fails the full run); its ratios need the floor's product count."""
    assert set(bench_kernels.DEFAULT_PLAN) == set(bench_kernels.METHODS) == set(bench_kernels.PRODUCTS)
    for workload, shapes in bench_kernels.DEFAULT_PLAN.items():
        assert shapes and set(shapes) <= set(bench_kernels.SHAPES), workload


def test_result_files_name_the_code_they_measured(tmp_path):
    stem = write_results(tmp_path, "demo", "A title", [{"x": 1}], "| x |\n|---|\n| 1 |", "cpu-test")
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["rows"] == [{"x": 1}]
    stamp = saved["provenance"]
    assert stamp["code_hash"] == code_hash()  # the package source, known without git (a lent GPU machine)
    assert stamp["commit"]  # a short hash, with +dirty when the package differs from it, or "unknown"
    assert provenance_line(stamp) in stem.with_suffix(".md").read_text()
