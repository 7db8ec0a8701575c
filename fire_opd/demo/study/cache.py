"""Every job run once: results cached under `runs/<name>.json` with the key of everything that
decides them (fire_opd/demo/provenance.py), read back when the key matches, the rest run in a
process pool."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Optional

from fire_opd.demo.recipes import EVAL_SAMPLES
from fire_opd.demo.study.grid import job_config, run_name
from fire_opd.demo.study.runner import assets_dir, run_job


def job_key(job: dict) -> str:
    """Everything that decides a job's result (provenance.run_key adds version and source)."""
    from fire_opd.demo.provenance import folder_hash, run_key
    from fire_opd.demo.run import get_setting

    setting = get_setting(job["setting"])
    folders = sorted({setting.student, setting.tokenizer, *setting.teachers.values()})
    config = job_config(job, job.get("quick", False)).to_dict()
    config.pop("output_dir", None)  # where a run writes its checkpoints decides nothing
    return run_key(
        {
            "job": {k: v for k, v in job.items() if k != "fresh"},
            "config": config,
            "eval_samples": EVAL_SAMPLES,
            "assets": {f: folder_hash(assets_dir() / f) for f in folders},
        }
    )


def read_cached(job: dict, runs_dir: Path) -> Optional[dict]:
    """The cached result of `job` when one with the same key exists (marked `cached`), else None."""
    path = runs_dir / f"{run_name(job)}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("cache_key") == job_key(job):
            return {**cached, "cached": True}
    return None


def _run_and_cache(args: tuple[dict, Path]) -> dict:
    """Run a job now (in a pool process) and cache it with the commit and date it ran on."""
    from fire_opd.demo.provenance import stamp

    job, runs_dir = args
    result = {**run_job(job), "job": job, "cache_key": job_key(job), **stamp()}
    (runs_dir / f"{run_name(job)}.json").write_text(json.dumps(result))
    return {**result, "cached": False}


def describe(result: dict) -> str:
    """One line: a run's greedy accuracy and avg@K, and whether it ran now or came from the cache."""
    greedy = result.get("accuracy", result.get("initial_accuracy"))
    sampled = result.get("sampled", result.get("initial_sampled")) or {}
    avg = next((f"{k} {v:.3f}" for k, v in sampled.items() if k.startswith("avg@")), "")
    origin = (
        f"cached, ran on commit {result.get('commit', '?')} at {result.get('date', '?')}"
        if result.get("cached")
        else f"ran now in {result['seconds']:.0f}s"
    )
    return f"{run_name(result.get('job', result))}: greedy {greedy:.3f} {avg} ({origin})"


def run_jobs(jobs: list[dict], out_dir: Path, workers: int, fresh: bool = False) -> list[dict]:
    """Every job's result: from the cache where its key matches (unless `fresh`), the others run
    in a pool of `workers` processes."""
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results = [] if fresh else [r for r in (read_cached(job, runs_dir) for job in jobs) if r is not None]
    for i, result in enumerate(results, start=1):
        print(f"[{i}/{len(jobs)}] {describe(result)}", flush=True)
    done = {run_name(r["job"]) for r in results}
    todo = [job for job in jobs if run_name(job) not in done]
    t0 = time.perf_counter()
    if todo:
        with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
            for result in pool.imap_unordered(_run_and_cache, [(job, runs_dir) for job in todo]):
                results.append(result)
                print(f"[{len(results)}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {describe(result)}", flush=True)
    seconds = sum(r["seconds"] for r in results)
    print(
        f"{len(results)} runs: {len(todo)} ran now, {len(results) - len(todo)} from the cache. A fresh run of all "
        f"of them takes about {seconds / max(workers, 1) / 60:.1f} min on this machine with --jobs {workers} "
        f"(the runs' own times, {seconds / 60:.1f} process-minutes, plus about 10 s of start-up each).",
        flush=True,
    )
    return results


def cached_results(out_dir: Path, split: str, quick: bool) -> tuple[list[dict], list[dict]]:
    """(current, stale): every run cached under `out_dir` for `split`, split by whether its key
    matches what the same job would be run with today (same config, assets, version and code)."""
    current: list[dict] = []
    stale: list[dict] = []
    for path in sorted((out_dir / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("split") != split or r.get("quick", False) != quick:
            continue
        job = r.get("job")
        if job is None:  # cached before jobs were recorded: its key cannot be checked
            stale.append(r)
            continue
        (current if r.get("cache_key") == job_key(job) else stale).append(r)
    return current, stale
