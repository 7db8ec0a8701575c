"""The test suite under torch releases newer than the one `make` pins for development.

    python benchmarks/newer_torch.py 2.14.1 2.15.0     # builds .venv-torch-<version> once each, runs the suite
    python benchmarks/newer_torch.py 2.15.0 --python python3.13   # .venv-torch-2.15.0-py3.13

`make test` installs the newest release of every dependency but torch: the Makefile pins
torch==2.13.0, the CPU build on the development machines' disk, because the package registries
hold only CUDA builds of later releases. Our users install the newest torch, with the Triton it
requires, so each later release is tested here once it is out: `.venv-torch-<version>` holds the
main `.venv`'s packages (its `pip freeze`, so the releases `make test` tested) with torch
`<version>`, its Triton and its CUDA libraries in place of torch 2.13 and Triton 3.9, and the
suite (verl's tests aside: verl pins its own torch) runs there on the CPU. The first build of a
release downloads its CUDA build, a few GB. On the development machines a pip constraint
(/etc/xdg/pip/constraints.txt) caps torch at the releases on their disk; run with
`PIP_CONSTRAINT=/dev/null` to test a release above it.

Results: benchmarks/results/newer-torch-cpu-<date>.{json,md} (newer-torch-py<xy>-cpu-<date>
with `--python`, e.g. py313): per release, the versions that
differ from the main venv's and pytest's verdict, with every test that did not pass.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
MAIN_VENV = ROOT / ".venv"
# torch, the packages built against one torch (torchvision, ...) and torch's own requirements (Triton,
# the CUDA libraries): left to pip when it installs the release under test
REPLACED = re.compile(r"^(torch|triton|nvidia-|cuda-)", re.IGNORECASE)
HARNESS_PACKAGES = ("torch", "triton", "transformers", "accelerate", "trl", "peft", "datasets", "numpy")


def main_requirements(venv: Path = MAIN_VENV) -> list[str]:
    """The main venv's `name==version` lines, torch, Triton and the CUDA libraries left out."""
    if not (venv / "bin" / "python").exists():
        raise SystemExit(f"{venv}: no venv; run `make .venv/.fire-opd-installed` first")
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return without_torch(out.splitlines())


def without_torch(freeze: list[str]) -> list[str]:
    """`pip freeze` lines less those REPLACED matches and anything not pinned by `==` (editable or
    direct-reference installs)."""
    return [line for line in freeze if "==" in line and not REPLACED.match(line)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("torch", nargs="+", help="torch releases (x.y.z)")
    parser.add_argument("--python", help="interpreter of the venvs (default: the one running this script)")
    parser.add_argument("--workers", default="2", help="pytest-xdist workers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    bad = [v for v in args.torch if not re.fullmatch(r"\d+\.\d+\.\d+", v)]
    if bad:
        parser.error(f"torch: expected release numbers such as 2.15.0, got {' '.join(bad)}")

    from _results import write_results
    from oldest_deps import build, installed, python_version, run_suite

    python = args.python or str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}")
    requirements = main_requirements()
    tag = f"-py{python_version(python)}" if args.python else ""  # .venv-torch-2.15.0-py3.13
    main_versions = installed(MAIN_VENV, list(HARNESS_PACKAGES))
    rows, table = [], ["| torch | Triton | Python | pytest (verl's tests aside) |", "|---|---|---|---|"]
    details = []
    for version in args.torch:
        venv = ROOT / f".venv-torch-{version}{tag}"
        build(venv, python, [f"torch=={version}", *requirements], harness=())  # the freeze holds pytest and its plugins
        versions = installed(venv, list(HARNESS_PACKAGES))
        verdict, not_passed, code = run_suite(venv, args.workers, allow_skips=False)
        rows.append(
            {"torch": version, "versions": versions, "verdict": verdict, "not_passed": not_passed, "exit": code}
        )
        table.append(f"| {versions['torch']} | {versions['triton']} | {versions['python']} | {verdict} |")
        details += [f"- torch {version}: {line}" for line in not_passed]
    others = ", ".join(f"{n} {v}" for n, v in main_versions.items() if n not in ("torch", "triton", "python"))
    text = "\n".join(
        table
        + ["", f"Every other package as in the main venv (`make test`'s), among them {others}."]
        + ([""] + details if details else [])
    )
    name = "newer-torch" + tag.replace(".", "")  # newer-torch-py313
    title = "The test suite under torch releases after the pinned one"
    stem = write_results(args.out, name, title, rows, text, "cpu")
    print(text)
    print(f"results: {stem}.md")
    return max(row["exit"] for row in rows)


if __name__ == "__main__":
    raise SystemExit(main())
