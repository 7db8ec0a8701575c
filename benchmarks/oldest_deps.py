"""The test suite on the oldest releases the package declares: every lower bound of
pyproject.toml's dependencies, and of the integrations the suite tests besides TRL (peft,
tensorboard, wandb), pinned exactly, in a venv of its own (`make test-oldest`).

    python benchmarks/oldest_deps.py            # builds .venv-oldest once, runs the suite, writes the result
    python benchmarks/oldest_deps.py --pins     # the pins only
    python benchmarks/oldest_deps.py --peers    # the same with TRL and Liger at their floors (.venv-oldest-peers)

`--peers` is the oldest environment a TRL user can have: TRL 1.16 and Liger 0.8 at the test
extra's floors, and every other floor lifted only as far as they require (uv's lowest-direct
resolution: transformers 4.56.2, datasets 4.8.4, tqdm 4.66.3, pyyaml 6.0.1 on 2026-12-07), on
Python 3.11, TRL's own floor. It is the only run of the TRL integration on transformers 4.x, where
TRL's Trainer computes the loss inside autocast on the CPU (it found fire_kernels' fused update failing
there). The result lists each lifted floor.

A user's environment may be this old, and `make test` only ever sees the newest releases, so a
bound nobody ran is a guess (until 2026-12-07 the package said torch >= 2.4 and transformers
>= 4.45, and neither could load a model through fire-opd). Results:
benchmarks/results/oldest-deps-<date>.{json,md}: the versions, and every test that did not pass.

What these floors leave out, and why:
- TRL and Liger: TRL 1.16 needs transformers >= 4.56.2, datasets >= 4.7 and Python >= 3.11,
  newer than our floors; their tests skip here and run in `--peers` and in `make test`.
- numpy < 2.4: the Triton interpreter of torch 2.6's Triton 3.2 (like 3.6's) fails under numpy
  2.4. The interpreter is how the suite runs kernels without a GPU; users compile them, which
  `make compile-matrix` checks for every Triton a torch pins.
- FSDP on CPU needs torch >= 2.9 (pytorch/pytorch#162338): fire-opd refuses it before, and its
  tests skip.
The floors are what this run found: torch 2.4 / 2.5 have no public `fully_shard`, transformers
before 4.56 no `from_pretrained(dtype=)`, matplotlib before 3.8.4, tensorboard before 2.18 and
wandb before 0.17.2 do not import under numpy 2, and tqdm 4.62.1 is datasets 2.19's own floor.
torch 2.6 has no CPU build on the package registries, so the first run downloads its CUDA
build (about 3 GB to fetch, 6 GB installed); it is not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
TESTED_EXTRAS = ("peft", "tensorboard", "wandb")  # of the `test` extra; the rest are tools or TRL / Liger
PEERS = ("trl", "liger-kernel")  # of the `test` extra: integrations whose own floors sit above ours
PEERS_PYTHON = "python3.11"  # TRL >= 1.15 requires it
HARNESS = ("numpy<2.4", "pytest>=7.4", "pytest-xdist>=3.5", "hypothesis>=6.90")


def lower_bound(requirement: str) -> str:
    """ "name==X" for a requirement "name>=X..."; a requirement without a lower bound is an error
    (its floor would be whatever pip finds)."""
    parsed = Requirement(requirement)
    floors = [spec.version for spec in parsed.specifier if spec.operator == ">="]
    if len(floors) != 1:
        raise SystemExit(f"pyproject.toml: {requirement!r} needs exactly one lower bound (>=)")
    return f"{parsed.name}=={floors[0]}"


def requirements(pyproject: Path = ROOT / "pyproject.toml", extras: tuple[str, ...] = TESTED_EXTRAS) -> list[str]:
    """The package's dependencies and those of the `test` extra named in `extras`, as declared."""
    project = tomllib.loads(pyproject.read_text())["project"]
    tested = [r for r in project["optional-dependencies"]["test"] if Requirement(r).name in extras]
    return project["dependencies"] + tested


def pins(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The package's dependencies and TESTED_EXTRAS, each pinned at its lower bound."""
    return [lower_bound(r) for r in requirements(pyproject)]


def peer_pins(python: str = PEERS_PYTHON) -> list[str]:
    """`requirements` with PEERS, each at the lowest release that installs beside the others on
    `python` (uv's lowest-direct resolution: a floor moves only where a peer requires more). Needs
    the package index."""
    declared = requirements(extras=TESTED_EXTRAS + PEERS)
    for requirement in declared:
        lower_bound(requirement)  # every one has a floor to start from
    try:
        from uv import find_uv_bin
    except ImportError:
        raise SystemExit("--peers needs uv (the test extra: pip install -e '.[test]')") from None
    version = python_version(python)
    with tempfile.TemporaryDirectory() as tmp:
        wanted, numpy = Path(tmp) / "requirements.in", Path(tmp) / "constraints.txt"
        wanted.write_text("\n".join(declared) + "\n")
        numpy.write_text(HARNESS[0] + "\n")  # the interpreter's numpy, as in build()
        lock = subprocess.run(
            [find_uv_bin(), "pip", "compile", "--quiet", "--resolution", "lowest-direct", "--python-version", version]
            + ["--no-header", "--no-annotate", str(wanted), "-c", str(numpy)],
            capture_output=True, text=True,
        )  # fmt: skip
    if lock.returncode != 0:  # no set of releases satisfies our requirements and the peers' together
        raise SystemExit(f"--peers: uv found no releases that install together on Python {version}:\n{lock.stderr}")
    resolved = dict(line.split("==") for line in lock.stdout.splitlines() if "==" in line)
    return [f"{Requirement(r).name}=={resolved[canonicalize_name(Requirement(r).name)]}" for r in declared]


def lifted(floors: list[str], resolved: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (our floor, the pin) for each of `floors` that `resolved` pins higher."""
    ours = dict(pin.split("==") for pin in floors)
    return {
        name: (ours[name], version)
        for name, version in (pin.split("==") for pin in resolved)
        if name in ours and Version(version) != Version(ours[name])
    }


def python_version(python: str) -> str:
    """ "3.11" for an interpreter named pythonX.Y (a path too; it need not run, as a pyenv shim
    may not), else the version it reports."""
    if named := re.fullmatch(r"python(\d+\.\d+)", Path(python).name):
        return named.group(1)
    code = "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def oldest_python(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The interpreter of `requires-python`'s floor, e.g. "python3.10" for ">=3.10"."""
    requires = tomllib.loads(pyproject.read_text())["project"]["requires-python"]
    return "python" + lower_bound(f"python{requires}").split("==")[1]


def build(venv: Path, python: str, pinned: list[str], harness: tuple[str, ...] = HARNESS) -> None:
    """`venv` on `python` with exactly `pinned` and `harness` (re-installed only when they change)
    and the package. benchmarks/newer_torch.py builds its venvs with it too."""
    stamp = venv / ".oldest-pins"
    wanted = "\n".join([python, *pinned, *harness])
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not shutil.which(python) or subprocess.run([python, "-c", ""], capture_output=True).returncode != 0:
        raise SystemExit(f"--python {python}: does not run; pass the path of such an interpreter")
    if stamp.exists() or not (venv / "bin" / "python").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *pinned, *harness], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    stamp.write_text(wanted)


def run_suite(venv: Path, workers: str, *, allow_skips: bool) -> tuple[str, list[str], int]:
    """(pytest's last line, its FAILED / ERROR / SKIPPED lines, its exit code) for the suite in
    `venv`, verl's tests aside (verl pins its own torch and transformers)."""
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "tests", "-n", workers, "-rfEs"]
        + ["--ignore=tests/test_integration_verl.py"],
        cwd=ROOT,
        env={**os.environ, **({"FIRE_OPD_ALLOW_SKIPS": "1"} if allow_skips else {})},
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-20000:], proc.stderr[-2000:], sep="\n")
    lines = proc.stdout.strip().splitlines()
    verdict = lines[-1] if lines else f"pytest exited {proc.returncode}"
    not_passed = [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    return verdict, not_passed, proc.returncode


def installed(venv: Path, names: list[str]) -> dict[str, str]:
    """name -> version installed in `venv`, and its Python's."""
    code = (
        "import sys, platform, importlib.metadata as m; print('python', platform.python_version()); "
        "[print(n, m.version(n)) for n in sys.argv[1:]]"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code, *names], capture_output=True, text=True, check=True)
    return dict(line.split() for line in out.stdout.splitlines())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pins", action="store_true", help="print the pins and exit")
    parser.add_argument("--peers", action="store_true", help="TRL and Liger at their floors too (see above)")
    parser.add_argument("--venv", type=Path, help="default: .venv-oldest, .venv-oldest-peers with --peers")
    parser.add_argument("--python", help=f"interpreter (default: requires-python's floor; {PEERS_PYTHON} with --peers)")
    parser.add_argument("--workers", default="2", help="pytest-xdist workers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    python = args.python or (PEERS_PYTHON if args.peers else oldest_python())
    venv = args.venv or ROOT / (".venv-oldest-peers" if args.peers else ".venv-oldest")
    pinned = peer_pins(python) if args.peers else pins()
    moved = lifted(pins(), pinned)
    if args.pins:
        print("\n".join(pinned))
        return 0
    build(venv, python, pinned)
    verdict, summary, returncode = run_suite(venv, args.workers, allow_skips=True)  # the skips named above
    names = [Requirement(p).name for p in pinned] + ["triton", "numpy"]
    versions = installed(venv, sorted(set(names)))
    raised = ", ".join(f"{name} {ours} -> {pin}" for name, (ours, pin) in moved.items())
    table = "\n".join(
        ["| package | version |", "|---|---|", *(f"| {n} | {v} |" for n, v in sorted(versions.items()))]
        + (["", f"Floors the peers' own lift: {raised}"] if moved else [])
        + ["", f"`pytest tests` (verl's tests aside): **{verdict}**", ""]
        + [f"- {line}" for line in summary]
    )
    from _results import write_results

    rows = [{"versions": versions, "lifted": moved, "verdict": verdict, "not_passed": summary, "exit": returncode}]
    title = "The test suite on the declared lower bounds" + (", TRL and Liger at theirs" if args.peers else "")
    stem = write_results(args.out, "oldest-deps-peers" if args.peers else "oldest-deps", title, rows, table, "cpu")
    print(f"results: {stem}.md")
    return returncode


if __name__ == "__main__":
    raise SystemExit(main())
