"""Per-trial overhead of the Ray Tune + MLflow path against the same trials run bare.

Runs N identical trials (real MiniLM, real Rotten Tomatoes) twice in one go:
  bare:  N sequential `python -m trainers ... tracking.enabled=false` processes (1 thread each)
  swept: one `peftsweep sweep` of the same N trials, one at a time (1 CPU each), MLflow on sqlite
and prints total wall times, per-trial overhead and the ratio swept/bare (goal <= 1.05).
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


def run_swept(rows: int, seeds: list[int], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(BIN / "peftsweep"), "sweep", "search=tiny", "search.full_ft_arm=false",
                    "search.space.method.r=[8]", f"search.seeds=[{','.join(map(str, seeds))}]",
                    "cluster.max_concurrent_trials=1", "cluster.cpus_per_trial=1", *data_overrides(rows)],
                   check=True, cwd=cwd, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=1, help="bare/swept pairs (medians are reported)")
    args = ap.parse_args()
    seeds = list(range(args.trials))
    bare_totals, swept_totals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = ("bare", "swept") if rep % 2 == 0 else ("swept", "bare")
            for which in order:
                if which == "bare":
                    bare_totals.append(sum(run_bare(args.rows, s, tmp) for s in seeds))
                else:
                    swept_totals.append(run_swept(args.rows, seeds, tmp))
                print(f"  {which}: {(bare_totals if which == 'bare' else swept_totals)[-1]:.1f} s", flush=True)
    bare, swept = statistics.median(bare_totals), statistics.median(swept_totals)
    print(f"\n{args.trials} trials x {args.rows} training rows, MiniLM LoRA r8 q,v, 1 thread each")
    print(f"| path | total s | per trial s |\n|---|---|---|")
    print(f"| bare (python -m trainers, no tracking) | {bare:.1f} | {bare / args.trials:.1f} |")
    print(f"| Ray Tune + MLflow (peftsweep sweep) | {swept:.1f} | {swept / args.trials:.1f} |")
    print(f"\noverhead per trial: {(swept - bare) / args.trials:+.1f} s; ratio swept/bare = {swept / bare:.3f} "
          f"(goal <= 1.05; includes Ray start-up amortized over {args.trials} trials)")


if __name__ == "__main__":
    main()
