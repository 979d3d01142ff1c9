"""Predicted vs measured peak memory for every trial of a finished sweep (the newest, or --sweep ID).

Prediction comes from `peftsweep plan`'s estimator (trainers/estimate.py) applied to each run's logged
trial config; measurement is the run's peak_vram_allocated_gb on CUDA, peak_host_rss_gb on CPU.
Usage: python bench/memory_estimate.py [--tracking-uri sqlite:///mlflow.db] [--sweep ID]   (goal: |error| <= 15 %)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="peftsweep")
    ap.add_argument("--sweep")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from evaluation.runs import trial_table
    from trainers.tracking import find_parent
    from trainers import record
    from trainers.config import load_trial_config
    from trainers.estimate import predict_trial
    from trainers.tracking import absolute_uri

    client = MlflowClient(absolute_uri(args.tracking_uri))
    parent = find_parent(client, args.experiment, args.sweep)
    trials = trial_table(client, parent)
    trials = trials[trials["status"] == "ok"]
    print(f"sweep {parent.data.tags.get(record.SWEEP_ID)}: {len(trials)} finished trials\n")
    print("| arm | seed | measured | predicted GB | measured GB | error % |\n|---|---|---|---|---|---|")
    errors = []
    for _, row in trials.iterrows():
        folder = "model" if row["method"] == "full" else record.ADAPTER_DIR
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(row["run_id"], f"{folder}/{record.TRIAL_CONFIG_FILE}", tmp)
            cfg = load_trial_config(path)
        predicted = predict_trial(cfg)["predicted_gb"]
        vram = row.get(record.PEAK_VRAM_ALLOCATED_GB)
        measured, what = (vram, "VRAM alloc") if vram == vram and vram is not None else (
            row[record.PEAK_HOST_RSS_GB], "host RSS")
        err = 100 * (predicted - measured) / measured
        errors.append(abs(err))
        print(f"| {row['arm']} | {int(row['seed'])} | {what} | {predicted:.2f} | {measured:.2f} | {err:+.1f} |")
    if errors:
        within = sum(e <= 15 for e in errors)
        print(f"\n{within}/{len(errors)} trials within ±15 %; worst |error| {max(errors):.1f} %")


if __name__ == "__main__":
    main()
