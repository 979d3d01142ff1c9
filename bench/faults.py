"""A sweep with injected faults, then the bookkeeping: trials finished, retried, lost, duplicated.

Real MiniLM on Rotten Tomatoes (small data), 4 LoRA arms + full FT, with three faults injected into three of
the arms: an exception, an out-of-memory that a smaller micro-batch avoids, and a SIGKILL of the trial's
process (retried by Ray, cluster.max_failures=1). Lost = a configuration with no finished record and no
recorded failure; duplicated = a configuration with more than one `ok` run. Goal: lost 0, duplicated 0.
Usage: python bench/faults.py
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
BIN = Path(sys.executable).parent
FAULTS = ["null", "raise@2", "'oom@1:bs>8'", "kill@1"]  # quoted: ':' and '>' are Hydra grammar


def main() -> None:
    from mlflow.tracking import MlflowClient

    from trainers import record

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        proc = subprocess.run(
            [str(BIN / "peftsweep"), "sweep", "search=tiny", "search.space.method.r=[8]",
             f"+search.space.train.inject_fault=[{','.join(FAULTS)}]", "cluster.max_failures=1",
             "task.train_size=256", "task.validation_size=100", "task.test_size=200", "train.max_steps=8",
             f"tracking.uri={uri}", f"tracking.artifact_location={tmp}/artifacts"],
            cwd=tmp, capture_output=True, text=True)
        if proc.returncode == 2:  # refused before any trial started
            sys.exit(proc.stderr.strip())
        c = MlflowClient(uri)
        runs = [r for r in c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
                if r.data.tags.get(record.ROLE) == "trial"]
    by_key = collections.defaultdict(list)
    for r in runs:
        by_key[r.data.tags[record.TRIAL_KEY]].append(r.data.tags[record.STATUS])
    finished = sum("ok" in s for s in by_key.values())
    failed_recorded = sum("ok" not in s and all(x in ("failed", "oom") for x in s) for s in by_key.values())
    retried = sum(len(s) - 1 for s in by_key.values())
    lost = sum(not s or any(x == "running" for x in s) for s in by_key.values())
    duplicated = sum(s.count("ok") > 1 for s in by_key.values())
    print(f"sweep exit code {proc.returncode}; {len(by_key)} configurations, {len(runs)} runs")
    print("| configurations | finished ok | failed, recorded | retried runs | lost | duplicated |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(by_key)} | {finished} | {failed_recorded} | {retried} | {lost} | {duplicated} |")
    for key, statuses in by_key.items():
        print(f"  {key}: {statuses}")


if __name__ == "__main__":
    main()
