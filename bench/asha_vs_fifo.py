"""Total trial-seconds of one grid under FIFO and under ASHA, side by side in one run.

Real MiniLM on Rotten Tomatoes, LoRA r x lr grid with validation every few steps; trial-seconds are summed
from each MLflow child run's start/end time (a pruned run ends when ASHA stops it).
Usage: python bench/asha_vs_fifo.py [--steps 40] [--eval-every 5]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
BIN = Path(sys.executable).parent


def sweep(scheduler: str, cwd: str, steps: int, eval_every: int) -> dict:
    uri = f"sqlite:///{cwd}/{scheduler}.db"
    subprocess.run([str(BIN / "peftsweep"), "sweep", "search=tiny", "search.full_ft_arm=false",
                    "search.space.method.r=[4,16]", "+search.space.train.lr=[3e-5,3e-4,3e-3]",
                    f"scheduler={scheduler}", f"scheduler.max_t={steps}", f"scheduler.grace_period={eval_every}",
                    "scheduler.reduction_factor=3", "search.metric=val_loss", "search.mode=min",
                    f"train.eval_every_steps={eval_every}", f"train.max_steps={steps}", "task.train_size=2000",
                    "task.validation_size=200", "task.test_size=500", f"tracking.uri={uri}",
                    f"tracking.artifact_location={cwd}/{scheduler}-artifacts"],
                   check=True, cwd=cwd, capture_output=True)
    from mlflow.tracking import MlflowClient

    from trainers import record

    c = MlflowClient(uri)
    runs = [r for r in c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
            if r.data.tags.get(record.ROLE) == "trial"]
    return {"trial_s": sum((r.info.end_time - r.info.start_time) / 1000 for r in runs),
            "statuses": [r.data.tags.get(record.STATUS) for r in runs],
            "best_val_loss": min(r.data.metrics.get("val_loss", float("inf")) for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fifo = sweep("fifo", tmp, args.steps, args.eval_every)
        asha = sweep("asha", tmp, args.steps, args.eval_every)
    print("| scheduler | trials | ok | pruned | trial-seconds | best val_loss |\n|---|---|---|---|---|---|")
    for name, r in (("FIFO", fifo), ("ASHA", asha)):
        print(f"| {name} | {len(r['statuses'])} | {r['statuses'].count('ok')} | {r['statuses'].count('pruned')} | "
              f"{r['trial_s']:.0f} | {r['best_val_loss']:.4f} |")
    print(f"\nASHA / FIFO trial-seconds = {asha['trial_s'] / fifo['trial_s']:.2f}")


if __name__ == "__main__":
    main()
