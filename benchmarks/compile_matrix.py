"""Which Triton releases compile our kernels, and where they spill: the compile report under each.

    python benchmarks/compile_matrix.py                        # every release a torch has pinned
    python benchmarks/compile_matrix.py --triton 3.2.0 3.6.0 --cache /tmp/triton-releases
    python benchmarks/compile_matrix.py --triton 3.4.0 3.9.0 --arch 100 120   # Blackwell

Each torch release for Linux pins one Triton (TORCH_PINS; the package needs torch >= 2.6, Triton
>= 3.2), so a user's Triton is often not the one the tiles were tuned under (3.9, which torch 2.15
pins). Each release is installed once with `pip install --no-deps --target <cache>/triton-<version>`
(a package registry is needed, not a GPU; about 600 MB each) and put first on PYTHONPATH for one
`python -m fire_kernels.compile_report --json`, which compiles every kernel variant for sm_80 and
sm_90 ahead of time and reports a variant whose compile aborts the process as that variant's
failure. Results: benchmarks/results/compile-matrix-aot-<date>.{json,md}
(compile-matrix-aot-sm100-sm120-<date> for other `--arch`):
per release the variants that compiled clean, spilled or failed, then every one that was not clean.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fire_kernels.compile_report import CompileResult

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

# The Triton each torch release requires on Linux x86-64 (`pip install --dry-run --report - torch==X`
# read from PyPI on 2026-12-06; torch 2.14 asks for triton ~= 3.8.0; torch 2.15.0, released
# 2026-10-28, asks for triton ~= 3.9.0, read from PyPI's metadata on 2026-12-08).
TORCH_PINS = {
    "3.0.0": "2.4",
    "3.1.0": "2.5",
    "3.2.0": "2.6",
    "3.3.0": "2.7.0",
    "3.3.1": "2.7.1",
    "3.4.0": "2.8",
    "3.5.0": "2.9.0",
    "3.5.1": "2.9.1",
    "3.6.0": "2.10, 2.11",
    "3.7.0": "2.12",
    "3.7.1": "2.13",
    "3.8.0": "2.14",
    "3.9.0": "2.15",  # the release the tiles were tuned under
}
RELEASES = tuple(TORCH_PINS)


def install(version: str, cache: Path) -> Path:
    """The folder holding Triton `version` (installed there on first use)."""
    target = cache / f"triton-{version}"
    if not (target / "triton" / "__init__.py").exists():
        print(f"installing triton {version} into {target}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(target),
                f"triton=={version}",
            ],
            check=True,
        )
    return target


def report(version: str, target: Path, cache: Path, archs: list[int]) -> list[dict]:
    """compile_report's rows for every variant and arch under the Triton in `target`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(ROOT)])
    env["TRITON_CACHE_DIR"] = str(cache / f"compiled-{version}")
    found = subprocess.run(
        [sys.executable, "-c", "import triton; print(triton.__version__)"], env=env, capture_output=True, text=True
    ).stdout.strip()
    if found != version:
        raise SystemExit(f"{target}: expected triton {version} first on the path, found {found or 'none'}")
    proc = subprocess.run(
        [sys.executable, "-m", "fire_kernels.compile_report", "--json", "--arch", *map(str, archs)],
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"triton {version}: compile_report printed no report:\n{proc.stderr[-2000:]}") from None


def status(row: dict) -> str:
    """compile_report's verdict on one of its JSON rows: "clean", "spills" or "failed"."""
    return CompileResult(**row).status


def tables(results: dict[str, list[dict]]) -> str:
    """The per-release summary, then every variant that did not compile clean."""
    out = [
        "| Triton | pinned by torch | variants | clean | spill | fail to compile |",
        "|---|---|---|---|---|---|",
    ]
    for version, rows in results.items():
        counts = {s: sum(status(r) == s for r in rows) for s in ("clean", "spills", "failed")}
        out.append(
            f"| {version} | {TORCH_PINS.get(version, '-')} | {len(rows)} | {counts['clean']} | "
            f"{counts['spills']} | {counts['failed']} |"
        )
    out += [
        "",
        "| Triton | kernel | variant | dtype | arch | registers | spill bytes or error |",
        "|---|---|---|---|---|---|---|",
    ]
    for version, rows in results.items():
        for r in rows:
            if status(r) != "clean":
                detail = r["spill_bytes"] if r["ok"] else r["error"]
                out.append(
                    f"| {version} | {r['kernel']} | {r['variant']} | {r['dtype']} | sm_{r['arch']} | "
                    f"{r['registers']} | {detail} |"
                )
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton", nargs="+", default=list(RELEASES), help="Triton releases (x.y.z)")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 90)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fire-opd-triton-releases")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    bad = [v for v in args.triton if not re.fullmatch(r"\d+\.\d+\.\d+", v)]
    if bad:
        parser.error(f"--triton: expected release numbers such as 3.2.0, got {' '.join(bad)}")

    from _results import write_results

    results = {}
    for version in args.triton:
        results[version] = report(version, install(version, args.cache), args.cache, args.arch)
        print(
            f"triton {version}: {sum(status(r) == 'clean' for r in results[version])} of {len(results[version])} clean"
        )
    text = tables(results)
    rows = [{"triton": version, **row} for version, version_rows in results.items() for row in version_rows]
    arch_names = " and ".join(f"sm_{arch}" for arch in args.arch)
    title = f"Every kernel variant compiled ahead of time for {arch_names} under each Triton release"
    label = "aot" if args.arch == [80, 90] else "aot-" + "-".join(f"sm{arch}" for arch in args.arch)
    stem = write_results(args.out, "compile-matrix", title, rows, text, label)
    print(text)
    print(f"results: {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
