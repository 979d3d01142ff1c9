"""What a trial on several workers costs against the same trial in one process, on the same cores.

One trial (real MiniLM, real Rotten Tomatoes, LoRA r8 on attention q,v; 40 steps at batch 16), run four ways in
one go, each on this machine's 2 cores:
  in-process   `peftsweep sweep` of the trial on 1 worker with 2 threads (today's path, no Ray Train)
  ray-train    the same sweep with train.workers=2 (a Ray Train run of 2 one-thread workers, DDP over gloo)
  bare         `python -m trainers` (no Ray at all), 2 threads
  torchrun     `torchrun --nproc_per_node 2 -m trainers train.workers=2` (DDP without Ray)
and prints each one's wall time, the trial's own wall_time_s (from its record), and the ratios ray-train /
in-process and torchrun / bare. Usage: python bench/workers.py [--rows 400] [--steps 40] [--repeats 1]
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
TRIAL = ["method.target_modules=attention_qv", "train.batch_size=16", "task.validation_size=200",
         "task.test_size=200"]
RANK = ["method.r=8", "method.alpha=16"]  # the sweep's search space sets these (search=tiny, r=[8], alpha 2r)


def _sweep(cwd: str, tag: str, rows: int, steps: int, workers: int) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{cwd}/{tag}.db"
    threads = ["cluster.cpus_per_trial=2"] if workers == 1 else ["cluster.cpus_per_trial=1"]
    start = time.perf_counter()
    subprocess.run([str(BIN / "peftsweep"), "sweep", "search=tiny", "search.full_ft_arm=false",
                    "search.space.method.r=[8]", *TRIAL, f"task.train_size={rows}", f"train.max_steps={steps}",
                    f"train.workers={workers}", *threads, f"tracking.uri={uri}",
                    f"tracking.artifact_location={cwd}/{tag}-artifacts"], check=True, cwd=cwd, capture_output=True)
    total = time.perf_counter() - start
    c = MlflowClient(uri)
    (trial,) = [r for r in c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
                if r.data.tags.get("peftsweep.role") == "trial"]
    return total, trial.data.metrics["wall_time_s"]


def _bare(cwd: str, rows: int, steps: int, workers: int) -> float:
    launcher = [sys.executable, "-m", "trainers"] if workers == 1 else \
        [str(BIN / "torchrun"), "--nproc_per_node", str(workers), "-m", "trainers"]
    threads = 2 if workers == 1 else 1
    start = time.perf_counter()
    subprocess.run([*launcher, "tracking.enabled=false", f"train.num_threads={threads}", *TRIAL, *RANK,
                    f"task.train_size={rows}", f"train.max_steps={steps}", f"train.workers={workers}"],
                   check=True, cwd=cwd, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    got: dict = {k: [] for k in ("in-process", "ray-train", "bare", "torchrun")}
    with tempfile.TemporaryDirectory() as cwd:
        for rep in range(args.repeats):
            got["in-process"].append(_sweep(cwd, f"one-{rep}", args.rows, args.steps, 1))
            got["ray-train"].append(_sweep(cwd, f"two-{rep}", args.rows, args.steps, 2))
            got["bare"].append((_bare(cwd, args.rows, args.steps, 1), None))
            got["torchrun"].append((_bare(cwd, args.rows, args.steps, 2), None))
    med = {k: statistics.median(w for w, _ in v) for k, v in got.items()}
    inner = {k: statistics.median(t for _, t in v) for k, v in got.items() if v[0][1] is not None}
    print(f"One MiniLM LoRA trial, {args.steps} steps, {args.rows} rows, 2 cores, median of {args.repeats}:")
    for k in got:
        trial = f"   trial's own wall_time_s {inner[k]:6.1f}" if k in inner else ""
        print(f"  {k:11s} wall {med[k]:6.1f} s{trial}")
    def ratio(a: str, b: str, i: int) -> str:
        """Median ratio of paired repeats (run side by side), with the range over repeats."""
        r = sorted(x[i] / y[i] for x, y in zip(got[a], got[b]))
        spread = f" (range {r[0]:.2f}-{r[-1]:.2f} over {len(r)} paired repeats)" if len(r) > 1 else \
            " (one repeat: no interval; --repeats 3 gives a range)"
        return f"{statistics.median(r):.2f}x{spread}"

    print(f"ray-train / in-process, whole sweep: {ratio('ray-train', 'in-process', 0)}")
    print(f"ray-train / in-process, the trial alone: {ratio('ray-train', 'in-process', 1)}")
    print(f"torchrun / bare: {ratio('torchrun', 'bare', 0)}")


if __name__ == "__main__":
    main()
