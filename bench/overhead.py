"""Per-trial overhead of the Ray Tune + MLflow path against the same trials run bare.

Runs N identical trials (real MiniLM, real Rotten Tomatoes) twice in one go:
  bare:  N sequential `python -m trainers ... tracking.enabled=false` processes (1 thread each)
  swept: one `peftsweep sweep` of the same N trials, one at a time (1 CPU each), MLflow on sqlite; the
         trials share one process (cluster.reuse_processes, the default)
  fresh: the same sweep with a process per trial (cluster.reuse_processes=false)
and prints total wall times, the sweep's one-time cost (start-up, validation, Ray up and down, read from the
MLflow runs' timestamps), and the per-trial ratio swept/bare with that one-time cost taken out (goal <= 1.05).
Order alternates bare/swept to spread machine noise. Usage: python bench/overhead.py [--trials 3] [--rows 500]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def data_overrides(rows: int) -> list[str]:
    return [f"task.train_size={rows}", "task.validation_size=200", "task.test_size=500"]


def run_bare(rows: int, seed: int, cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainers", "tracking.enabled=false", "train.num_threads=1",
                    f"train.seed={seed}", "method.target_modules=attention_qv", *data_overrides(rows)],
                   check=True, cwd=cwd, capture_output=True)
    return time.perf_counter() - start


def run_swept(rows: int, seeds: list[int], cwd: str, rep: str, reuse: bool = True) -> tuple[float, float]:
    """(total s, fixed s): fixed is the sweep's one-time cost — process start, validation, Ray start-up
    before the first trial, and shutdown after the last — read from the MLflow runs' own timestamps."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{cwd}/overhead-{rep}.db"
    start = time.perf_counter()
    subprocess.run([str(BIN / "peftsweep"), "sweep", "search=tiny", "search.full_ft_arm=false",
                    "search.space.method.r=[8]", f"search.seeds=[{','.join(map(str, seeds))}]",
                    "cluster.max_concurrent_trials=1", "cluster.cpus_per_trial=1", *data_overrides(rows),
                    f"cluster.reuse_processes={str(reuse).lower()}",
                    f"tracking.uri={uri}", f"tracking.artifact_location={cwd}/artifacts-{rep}"],
                   check=True, cwd=cwd, capture_output=True)
    total = time.perf_counter() - start
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    trials = [r for r in runs if r.data.tags.get("peftsweep.role") == "trial"]
    in_trials = (max(r.info.end_time for r in trials) - min(r.info.start_time for r in trials)) / 1000
    return total, total - in_trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=1, help="bare/swept pairs (medians are reported)")
    args = ap.parse_args()
    seeds = list(range(args.trials))
    totals: dict = {"bare": [], "swept": [], "fresh": []}
    fixed: dict = {"swept": [], "fresh": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = ("bare", "swept", "fresh") if rep % 2 == 0 else ("fresh", "swept", "bare")
            for which in order:
                if which == "bare":
                    totals["bare"].append(sum(run_bare(args.rows, s, tmp) for s in seeds))
                else:
                    total, once = run_swept(args.rows, seeds, tmp, f"{which}-{rep}", reuse=which == "swept")
                    totals[which].append(total)
                    fixed[which].append(once)
                print(f"  {which}: {totals[which][-1]:.1f} s", flush=True)
    bare, swept, fresh = (statistics.median(totals[k]) for k in ("bare", "swept", "fresh"))
    once, once_fresh = statistics.median(fixed["swept"]), statistics.median(fixed["fresh"])
    n = args.trials
    print(f"\n{n} trials x {args.rows} training rows, MiniLM LoRA r8 q,v, 1 thread each, one at a time")
    print("| path | total s | per trial s |\n|---|---|---|")
    print(f"| bare (python -m trainers, no tracking) | {bare:.1f} | {bare / n:.1f} |")
    print(f"| Ray Tune + MLflow (peftsweep sweep), one process for the trials | {swept:.1f} | {swept / n:.1f} |")
    print(f"| of which once per sweep (start, validation, Ray up/down) | {once:.1f} | |")
    print(f"| the same, a process per trial (cluster.reuse_processes=false) | {fresh:.1f} | {fresh / n:.1f} |")
    print(f"\nper-trial: (swept - once per sweep) / bare = {(swept - once) / bare:.3f} (goal <= 1.05)")
    print(f"per-trial, a process per trial: (fresh - once per sweep) / bare = {(fresh - once_fresh) / bare:.3f}")
    print(f"whole sweep incl. one-time start-up: swept / bare = {swept / bare:.3f}; fresh / swept = "
          f"{fresh / swept:.3f}")


if __name__ == "__main__":
    main()
