"""The benchmark scripts' own contracts that their `--quick` smoke runs in `make test` cannot see:
the default run (`make bench`) has a plan for every workload, and every result file says which
code it measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_kernels  # noqa: E402
from _results import cpu, provenance_line, write_results  # noqa: E402

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


def test_a_result_name_may_hold_a_release_number(tmp_path):
    stem = write_results(tmp_path, "newer-torch-py3.13", "A title", [{"x": 1}], "| x |", "cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem.name}.json", f"{stem.name}.md"]
    assert stem.name.startswith("newer-torch-py3.13-cpu-")


# ----------------------------------------------------------------------------- the GPU check
# A lent GPU machine gives back only the files of a folder, and stops a command at its time limit:
# the check must leave what it has measured on disk after every phase and row, and stop its own
# phases in time.

import gpu_check  # noqa: E402


def test_the_gpu_check_hands_each_finished_row_to_its_checkpoint_in_order(monkeypatch):
    def run_one(workload, method, shape, tokens, device, dtype, repeats, timeout):
        assert 0 < timeout <= gpu_check.ROW_TIMEOUT_S  # no row may run past the budget
        return {"time_s": 0.001, "peak_above_inputs_bytes": 1, "grad_bytes": 0, "input_bytes": 1}

    monkeypatch.setattr(gpu_check.bench_kernels, "run_one", run_one)
    saved: list[list[str]] = []
    rows = gpu_check.run_anchors(
        True, "cpu", "float32", 600.0, gpu_check.time.perf_counter(), 1, lambda done: saved.append(
            [r["method"] for r in done])
    )  # fmt: skip
    assert [len(s) for s in saved] == list(range(1, len(rows) + 1))
    assert saved[-1] == [r["method"] for r in rows]  # in the order they ran
    ours = [r["method"] in gpu_check.FIRST for r in rows]  # the floor and our paths before any peer
    assert ours == sorted(ours, reverse=True) and sum(ours) == 3 * len(gpu_check.ANCHORS)
    cuda_only = [r for r in rows if r["method"] in gpu_check.bench_kernels.CUDA_ONLY]
    assert cuda_only and all(r["error"] == "needs CUDA" for r in cuda_only)


def test_the_gpu_check_puts_our_two_paths_side_by_side_for_auto():
    """The Markdown that comes back from a lent machine opens with chunked against triton on every
    anchor (the figures `auto` is set from), naming a path that failed or did not run."""
    first, second, third, *_ = gpu_check.ANCHORS
    mib = 2**20
    rows = [
        {"anchor": first, "method": "chunked", "time_s": 0.004, "peak_above_inputs_bytes": 300 * mib},
        {"anchor": first, "method": "triton", "time_s": 0.003, "peak_above_inputs_bytes": 200 * mib},
        {"anchor": second, "method": "chunked", "time_s": 0.002, "peak_above_inputs_bytes": mib},
        {"anchor": second, "method": "triton", "error": "RuntimeError: out of resources"},
    ]
    table = gpu_check.paths_table(rows)
    assert len(table) == 2 + len(gpu_check.ANCHORS)
    assert table[2].split("|")[2:8] == [" 4.0 ", " 3.0 ", " 0.75 ", " 300 ", " 200 ", " triton "]
    assert "triton: RuntimeError: out of resources" in table[3]
    assert "chunked: not run" in table[4] and "triton: not run" in table[4]
    assert gpu_check.ANCHORS[third][0] in table[4]


def test_the_gpu_check_writes_its_files_when_no_row_fits_the_budget(tmp_path):
    assert gpu_check.main(["--dry", "--no-tests", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    (saved,) = [json.loads(p.read_text()) for p in tmp_path.glob("*-gpu-check-dry.json")]
    assert saved["complete"] and saved["provenance"]["code_hash"] == code_hash()
    assert saved["rows"] and all(r["error"].startswith(("not run", "needs CUDA")) for r in saved["rows"])
    assert len(list(tmp_path.glob("*-gpu-check-dry.*"))) == 3  # .json, .md, .png


def test_the_gpu_check_stops_its_tests_at_their_budget_and_keeps_their_log(tmp_path):
    """The whole pytest process group is stopped (its xdist workers on a GPU), and the summary
    says so; the log is the one the device brings back."""
    log = tmp_path / "tests.log"
    started = gpu_check.time.perf_counter()
    tests = gpu_check.run_cuda_tests(True, log, budget_s=2.0, workers=1)
    assert gpu_check.time.perf_counter() - started < 30
    assert tests["returncode"] == 124 and tests["summary"].startswith("stopped after 2s")
    assert log.exists()


def test_every_result_file_the_docs_cite_is_committed():
    """A figure in the README or the docs names the file it came from; that file must be there
    (a path under benchmarks/results/, or a dated result file's bare name)."""
    import re

    results = ROOT / "benchmarks" / "results"
    names = {p.name for p in results.rglob("*")}
    cited = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        for path in re.findall(r"benchmarks/results/([A-Za-z0-9_./-]*[A-Za-z0-9_/-])", text):
            cited.append((page.name, path, (results / path).exists()))
        for name in re.findall(r"`([A-Za-z0-9_.-]+-20\d\d-\d\d-\d\d[A-Za-z0-9_.-]*\.(?:md|txt|json|png))`", text):
            cited.append((page.name, name, name in names))
    assert len(cited) > 20
    assert [(page, path) for page, path, found in cited if not found] == []


# ----------------------------------------------------------------------------- fixed-seed identity
def test_check_identical_says_when_the_fingerprints_it_compares_come_from_another_machine(
    tmp_path, monkeypatch, capsys
):
    """Fingerprints differ across CPUs with the same code (three CPUs so far, 2026-12-07): a
    comparison with another machine's file must say so beside its verdict."""
    import check_identical

    fingerprint = {"weights": "w", "metrics": "m", "final_loss": 1.0}
    monkeypatch.setattr(check_identical, "run_case", lambda name, spec, work: dict(fingerprint))
    assert cpu().endswith(" cores") and cpu().count(",") >= 2  # model, instruction set, cores
    here = {"cpu": cpu(), "torch": check_identical.torch.__version__}
    for machine, noted in [(here, False), ({"cpu": "another CPU", "torch": "2.0"}, True), (None, True)]:
        before = tmp_path / "before.json"
        record = {"commit": "abc", "cases": {"resume": fingerprint}, **({"machine": machine} if machine else {})}
        before.write_text(json.dumps(record))
        written = tmp_path / "after.json"
        assert check_identical.main(["--cases", "resume", "--compare", str(before), "--write", str(written)]) == 0
        out = capsys.readouterr().out
        assert ("note:" in out) == noted and "all 1 cases bit-identical" in out
        assert json.loads(written.read_text())["machine"] == here


# ----------------------------------------------------------------------------- the verified filter's cost
def test_bench_verify_runs_the_base_beside_this_tree_and_says_whether_their_decisions_agree(tmp_path, monkeypatch):
    """`bench_verify.py --base REV` runs REV's package from a `git archive` of REV beside this tree,
    alternating which goes first, and reports each one's medians and whether the verification's
    decisions were the same. (The runs are replaced here: a real one trains for a minute.)"""
    import bench_verify

    calls = []

    def fake_run(tree, steps):
        assert (tree / "fire_opd" / "train" / "verify.py").is_file() and steps == 3
        version = "new" if tree == ROOT else "base"
        calls.append(version)
        calls_per_step = {"base": 9.0, "new": 1.0}[version]
        return {
            "time/verify_s": calls_per_step / 10, "time/sample_s": 1.0, "fire/verified_rollouts": 12.0,
            "fire/verify_tokens": 300.0, "generate_calls": calls_per_step, "reliable": [3.0, 4.0, 5.0],
        }  # fmt: skip

    monkeypatch.setattr(bench_verify, "run", fake_run)
    assert bench_verify.main(["--base", "HEAD", "--steps", "3", "--rounds", "2", "--out", str(tmp_path)]) == 0
    assert calls == ["base", "new", "new", "base"]
    (md,) = tmp_path.glob("verify-*.md")
    text = md.read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and "version" not in line]
    assert [(r[2].strip(), r[6].strip()) for r in rows] == [("0.900", "9.0"), ("0.100", "1.0")]
    assert "decisions (reliable rollouts per step) were the same in every run" in text


def test_bench_verify_names_a_bad_base_before_running_anything(capsys):
    import bench_verify

    with pytest.raises(SystemExit):
        bench_verify.main(["--base", "no-such-revision"])
    assert "--base: expected a git revision" in capsys.readouterr().err


# ----------------------------------------------------------------------------- revisions compared
def test_compare_revisions_runs_the_base_from_its_own_unpacked_tree_in_alternating_order(tmp_path, monkeypatch):
    """`compare_revisions.py --base REV` times REV's own worker script from a `git archive` of REV
    beside the working tree, alternating which goes first; the table's last column is new / base of
    the median ratio to the floor. (The workers are replaced here: a real row takes seconds.)"""
    import compare_revisions

    calls = []

    def fake_worker(tree, workload, method, args):
        assert (tree / "benchmarks" / "bench_kernels.py").is_file()
        assert (tree / "fire_kernels" / "__init__.py").is_file()
        version = "new" if tree == ROOT else "base"
        calls.append((version, method))
        # base: chunked 1.5x the floor; new: 1.2x
        return {"floor": 2.0, "chunked": 3.0 if version == "base" else 2.4}[method]

    monkeypatch.setattr(compare_revisions, "_worker", fake_worker)
    assert compare_revisions.main(["--base", "HEAD", "--workloads", "kl", "--rounds", "2", "--out", str(tmp_path)]) == 0
    assert [v for v, m in calls if m == "floor"] == ["base", "new", "new", "base"]
    (md,) = tmp_path.glob("compare-*.md")
    rows = [line for line in md.read_text().splitlines() if line.startswith("| kl |")]
    assert rows[0].split("|")[6].strip() == "1.50" and rows[1].split("|")[6].strip() == "1.20"
    assert rows[1].split("|")[7].strip() == "0.80"


def test_compare_revisions_names_a_bad_base_before_running_anything(capsys):
    import compare_revisions

    with pytest.raises(SystemExit):
        compare_revisions.main(["--base", "no-such-revision"])
    assert "--base: expected a git revision" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_revisions.main(["--base", "HEAD", "--method", "triton"])  # no CPU path
    assert "--method: expected a CPU method" in capsys.readouterr().err


def _compile_row(kernel: str, ok: bool, spill_bytes, error: str = "") -> dict:
    registers = 255 if ok else None
    return dict(
        kernel=kernel,
        variant="v",
        dtype="bf16",
        arch=90,
        ok=ok,
        registers=registers,
        spill_bytes=spill_bytes,
        error=error,
    )


def test_compile_matrix_counts_each_release_and_lists_what_was_not_clean():
    import compile_matrix

    died = "compiler process died (exit -6): boom"
    text = compile_matrix.tables(
        {
            "3.2.0": [_compile_row("a", True, 0), _compile_row("b", True, 24), _compile_row("c", False, None, died)],
            "3.10.0": [_compile_row("a", True, 0)],
        }
    )
    assert "| 3.2.0 | 2.6 | 3 | 1 | 1 | 1 |" in text
    assert "| 3.10.0 | - | 1 | 1 | 0 | 0 |" in text
    assert "| 3.2.0 | b | v | bf16 | sm_90 | 255 | 24 |" in text
    assert f"| 3.2.0 | c | v | bf16 | sm_90 | None | {died} |" in text
    assert "| 3.10.0 | a |" not in text


def test_compile_matrix_names_a_bad_release_before_installing_anything(capsys):
    import compile_matrix

    with pytest.raises(SystemExit):
        compile_matrix.main(["--triton", "3.2", "latest"])
    assert "--triton: expected release numbers such as 3.2.0, got 3.2 latest" in capsys.readouterr().err


def test_newer_torch_names_a_bad_release_before_installing_anything(capsys):
    import newer_torch

    with pytest.raises(SystemExit):
        newer_torch.main(["2.15", "nightly"])
    assert "torch: expected release numbers such as 2.15.0, got 2.15 nightly" in capsys.readouterr().err


def test_newer_torch_keeps_the_main_venv_but_torch_and_what_torch_brings():
    import newer_torch

    freeze = ["numpy==2.3.4", "torch==2.13.0+cpu", "triton==3.9.0", "nvidia-cublas==13.1.1.3", "cuda-bindings==13.5.0"]
    freeze += ["transformers==5.25.0", "-e /work/main", "fire-opd @ file:///work/main", "torchvision==0.28.0"]
    assert newer_torch.without_torch(freeze) == ["numpy==2.3.4", "transformers==5.25.0"]


def test_oldest_deps_pins_every_lower_bound_the_package_declares(tmp_path):
    """`make test-oldest` installs exactly the floors of pyproject.toml (so a bound changed there is
    the bound tested), and a dependency without a floor is an error, not whatever pip finds."""
    import oldest_deps

    pinned = oldest_deps.pins()
    assert "torch==2.6" in pinned and "transformers==4.56" in pinned and "peft==0.13" in pinned
    assert not any(name.startswith(("trl", "liger", "ruff")) for name in pinned)
    assert all("==" in pin and "," not in pin for pin in pinned)

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["torch>=2.6,<3", "pyyaml"]\n'
        '[project.optional-dependencies]\ntest = ["wandb>=0.17"]\n'
    )
    with pytest.raises(SystemExit, match="'pyyaml' needs exactly one lower bound"):
        oldest_deps.pins(pyproject)
    pyproject.write_text(pyproject.read_text().replace('"pyyaml"', '"pyyaml>=6.0"'))
    assert oldest_deps.pins(pyproject) == ["torch==2.6", "pyyaml==6.0", "wandb==0.17"]
    assert oldest_deps.oldest_python() == "python3.10"  # requires-python = ">=3.10"


def test_oldest_deps_peers_start_from_our_floors_and_name_each_one_they_lift():
    """`make test-oldest`'s second run adds TRL and Liger at the test extra's floors; every other
    requirement is the one pyproject.toml declares (so it starts from our floor, and an excluded
    release stays excluded), and the result names each floor the peers' own requirements lift."""
    import oldest_deps
    from packaging.requirements import Requirement

    declared = oldest_deps.requirements(extras=oldest_deps.TESTED_EXTRAS + oldest_deps.PEERS)
    names = [Requirement(r).name for r in declared]
    assert set(names) - {Requirement(p).name for p in oldest_deps.pins()} == {"trl", "liger-kernel"}
    assert all(oldest_deps.lower_bound(r) for r in declared)
    datasets = Requirement(next(r for r in declared if r.startswith("datasets")))
    assert "4.7.0" not in datasets.specifier and "4.8.4" in datasets.specifier
    floors = ["torch==2.6", "transformers==4.56", "tqdm==4.62.1"]
    resolved = ["torch==2.6.0", "transformers==4.56.2", "tqdm==4.62.1", "trl==1.16.0"]
    assert oldest_deps.lifted(floors, resolved) == {"transformers": ("4.56", "4.56.2")}
    assert oldest_deps.python_version("/no/such/bin/python3.11") == "3.11"  # by name: a shim need not run
