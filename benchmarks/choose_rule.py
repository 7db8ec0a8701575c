"""Step 2 of the issue-30 study: which selection rule goes on to the held-out seeds, by the rule
fixed in benchmarks/results/study-rules/preregistration.md before any run.

    python benchmarks/choose_rule.py [benchmarks/results/study-rules/validation]

Reads that folder's `study.json` (written by `fire-opd study --split validation ...`), pairs each
candidate with OPD by setting and seed, and carries forward the candidate with the highest minimum
over the settings of its mean avg@8 difference from OPD. A tie (within 0.005 of that best minimum)
goes to the cheaper rule: verification generates, so it loses a tie to any rule that does not; the
others cost the same and the higher minimum wins. Prints the table and writes `rule-choice.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fire_opd.demo.study.grid import RULE_CANDIDATES, RULE_SETTINGS  # noqa: E402
from fire_opd.demo.study.report import metric_values, paired_difference  # noqa: E402

METRIC = "avg@8"
TIE = 0.005
GENERATES = {"fire_verified"}  # the rules with an extra generation per step


def differences(runs: list[dict], candidate: str, setting: str) -> list[float]:
    """Per-seed avg@8 difference of `candidate` from OPD in `setting` (full-vocabulary objective)."""
    by_seed: dict = {}
    for r in runs:
        if r["kind"] == "train" and r["setting"] == setting and r["objective"] == "full_vocab":
            by_seed.setdefault(r["seed"], {})[r["variant"]] = metric_values(r["accuracy"], r.get("sampled"))[METRIC]
    return [v[candidate] - v["opd"] for _, v in sorted(by_seed.items()) if candidate in v and "opd" in v]


def setting_means(runs: list[dict], candidate: str, where: Path) -> dict[str, dict]:
    """{setting: {"mean", "seeds"}}: `candidate`'s mean per-seed avg@8 difference from OPD in each
    of the study's settings (runs read from `where`; every setting must have a pair)."""
    means = {}
    for setting in RULE_SETTINGS:
        diffs = differences(runs, candidate, setting)
        if not diffs:
            raise SystemExit(f"{where}: no paired {candidate} / opd runs in {setting}")
        means[setting] = {"mean": paired_difference(diffs)[0], "seeds": len(diffs)}
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=ROOT / "benchmarks/results/study-rules/validation")
    folder = parser.parse_args().folder
    runs = json.loads((folder / "study.json").read_text())["runs"]
    rows = []
    for candidate in [c for c in RULE_CANDIDATES if c != "opd"]:
        per_setting = setting_means(runs, candidate, folder)
        rows.append(
            {"candidate": candidate, "settings": per_setting, "minimum": min(v["mean"] for v in per_setting.values())}
        )
    best = max(r["minimum"] for r in rows)
    tied = [r for r in rows if r["minimum"] >= best - TIE]
    cheap = [r for r in tied if r["candidate"] not in GENERATES] or tied
    chosen = max(cheap, key=lambda r: r["minimum"])["candidate"]

    print(f"mean {METRIC} difference from OPD on the validation split (seeds per cell in parentheses)")
    print("| candidate | " + " | ".join(RULE_SETTINGS) + " | minimum |")
    print("|---|" + "---|" * (len(RULE_SETTINGS) + 1))
    for r in rows:
        cells = [f"{r['settings'][s]['mean']:+.3f} ({r['settings'][s]['seeds']})" for s in RULE_SETTINGS]
        mark = " **(chosen)**" if r["candidate"] == chosen else ""
        print(f"| {r['candidate']}{mark} | " + " | ".join(cells) + f" | {r['minimum']:+.3f} |")
    print(
        f"tied within {TIE} of the best minimum {best:+.3f}: {[r['candidate'] for r in tied]}; "
        f"carried forward: {chosen}"
    )
    (folder / "rule-choice.json").write_text(
        json.dumps(
            {"metric": METRIC, "tie": TIE, "rows": rows, "tied": [r["candidate"] for r in tied], "chosen": chosen},
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
