"""GPU-pool scheduling: 12 trials on 4 GPUs, packed by predicted memory vs one trial per GPU, side by side.

The trials are the real configurations of a SmolLM2-135M LoRA sweep (r x modules x batch, sequence length
1024) planned by peftsweep itself: `trainers/estimate.py` predicts each one's peak VRAM, `sweeps/packing.py`
turns it into a GPU share, and real Ray Tune places them on 4 logical GPUs (`ray.init(num_gpus=4)`).
This machine has no GPU, so each trial's training is stood in for by holding its placement for a time
proportional to its training FLOPs (LoRA-aware, trainers/flops.py); what is measured is the scheduler:
placement, Ray's per-trial overhead, makespan, and that no GPU ever holds more predicted memory than it has.
Co-located trials do not slow each other down here; on a real GPU they do once it is compute-bound, so the
trials-per-hour gain printed is the scheduler's ceiling, reached by trials too small to saturate a GPU.

Trials start most-FLOPs-first, as `peftsweep sweep` starts them (--grid-order for the plain grid order).
Usage: python bench/packing.py [--seconds-per-pflop 60] [--gpu-memory-gb 80] [--grid-order]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
GPUS = 4
STEPS = 100  # optimizer steps per trial


def plan(gpu_memory_gb: float, grid_order: bool = False, batch_sizes: str = "[4,8,16]",
         seeds: str = "[0]") -> list[dict]:
    """12 real trial configs with their predicted peak, GPU share and training FLOPs, in the order the sweep
    starts them (most FLOPs first, as sweeps/plan.py orders them), or in grid order."""
    from sweeps.config import load, trial_dict
    from sweeps.packing import trial_gpu_request
    from sweeps.space import expand
    from trainers.config import trial_config_from_dict
    from trainers.estimate import predict_train_flops

    cfg = load(["model=smollm2_135m", "task=rotten_tomatoes_sft", "task.max_length=1024", "search=tiny",
                "search.full_ft_arm=false", "search.space.method.r=[8,64]",
                "+search.space.method.target_modules=[attention_qv,all_linear]",
                f"+search.space.train.batch_size={batch_sizes}", f"search.seeds={seeds}", f"train.max_steps={STEPS}",
                "cluster.gpus_per_trial=auto",
                f"cluster.gpu_memory_gb={gpu_memory_gb}"])
    trials = []
    for t in expand(cfg.search, trial_dict(cfg)):
        share, predicted = trial_gpu_request(t, cfg.cluster)
        tc = trial_config_from_dict(t)
        trials.append({"name": f"r{tc.method.r}-{tc.method.target_modules}-bs{tc.train.batch_size}-s{tc.train.seed}",
                       "predicted_gb": predicted, "share": share, "pflop": predict_train_flops(tc) / 1e15})
    return trials if grid_order else sorted(trials, key=lambda t: -t["pflop"])


def run(trials: list[dict], packed: bool, seconds_per_pflop: float, storage: str) -> list[dict]:
    """Real Ray Tune over the planned trials; each holds its placement for its FLOPs' worth of time."""
    import ray
    from ray import tune

    by_name = {t["name"]: t for t in trials}

    def trainable(config):
        t = by_name[config["name"]]
        start = time.time()
        time.sleep(t["pflop"] * seconds_per_pflop)
        tune.report({"start": start, "end": time.time(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                     "share": ray.get_runtime_context().get_assigned_resources().get("GPU", 0)})

    def resources(config):
        return {"cpu": 0.1, "gpu": by_name[config["name"]]["share"] if packed else 1}

    ray.init(num_cpus=32, num_gpus=GPUS, include_dashboard=False, logging_level="error",
             object_store_memory=256 * 1024 ** 2)
    try:
        tuner = tune.Tuner(tune.with_resources(trainable, resources),
                           param_space={"name": tune.grid_search(list(by_name))},
                           run_config=tune.RunConfig(name=f"{'packed' if packed else 'whole'}-{time.time_ns()}", storage_path=storage,
                                                     verbose=0))
        started = time.time()
        grid = tuner.fit()
        wall = time.time() - started
    finally:
        ray.shutdown()
    rows = [{**by_name[r.config["name"]], **r.metrics} for r in grid]
    for r in rows:
        r["duration"] = r["end"] - r["start"]
    makespan = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    return rows, makespan, wall


def oversubscribed(rows: list[dict]) -> float:
    """The largest sum of reserved shares on one GPU at any trial's start (must be <= 1)."""
    worst = 0.0
    for r in rows:
        same = [o for o in rows if o["gpu"] == r["gpu"] and o["start"] <= r["start"] < o["end"]]
        worst = max(worst, sum(o["share"] for o in same))
    return worst


# (title, batch sizes, seeds): 12 trials each
SCENARIOS = (("mixed: r {8,64} x {q,v; all linear} x batch {4,8,16}", "[4,8,16]", "[0]"),
             ("small: r {8,64} x {q,v; all linear} x batch 4 x 3 seeds", "[4]", "[0,1,2]"))


def scenario(title: str, trials: list[dict], args, storage: str) -> None:
    print(f"\n### {title}\n\n{len(trials)} trials (SmolLM2-135M LoRA, seq 1024, {STEPS} steps) on {GPUS} x "
          f"{args.gpu_memory_gb:.0f} GB logical GPUs, started {'in grid order' if args.grid_order else 'longest first'}\n")
    print("| trial | predicted peak GB | GPU share | training PFLOP |\n|---|---|---|---|")
    for t in trials:
        print(f"| {t['name']} | {t['predicted_gb']:.1f} | {t['share']:.2f} | {t['pflop']:.2f} |")
    results = {packed: run(trials, packed, args.seconds_per_pflop, storage) for packed in (False, True)}
    print("\n| placement | makespan s | sum of trial s | (sum / 4) / makespan | share-weighted GPU use | "
          "trials / hour | most shares on one GPU at once |\n|---|---|---|---|---|---|---|")
    per_hour = {}
    for packed, (rows, makespan, _) in results.items():
        total = sum(r["duration"] for r in rows)
        used = sum(r["duration"] * (r["share"] if packed else 1) for r in rows) / (GPUS * makespan)
        per_hour[packed] = len(rows) / makespan * 3600
        print(f"| {'packed by predicted memory' if packed else 'one trial per GPU'} | {makespan:.1f} | {total:.1f} | "
              f"{total / GPUS / makespan:.2f} | {used:.2f} | {per_hour[packed]:.0f} | {oversubscribed(rows):.2f} |")
    rows, makespan, _ = results[False]
    print(f"\nscheduling efficiency, one trial per GPU: (sum of trial times / {GPUS}) / makespan = "
          f"{sum(r['duration'] for r in rows) / GPUS / makespan:.2f} (goal >= 0.9)")
    print(f"trials per hour, packed / one per GPU = {per_hour[True] / per_hour[False]:.2f} (goal >= 2 for small trials)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds-per-pflop", type=float, default=60.0,
                    help="stand-in training time per PFLOP (wall time scale only; ratios do not depend on it)")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0)
    ap.add_argument("--grid-order", action="store_true", help="start trials in grid order, not longest first")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for title, batch_sizes, seeds in SCENARIOS:
            scenario(title, plan(args.gpu_memory_gb, args.grid_order, batch_sizes, seeds), args, tmp)


if __name__ == "__main__":
    main()
