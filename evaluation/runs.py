"""A sweep as MLflow holds it: a table of its child runs, one row per trial (found by trainers/tracking.py)."""
from __future__ import annotations

import pandas as pd

from trainers import record, tracking

PARAM_COLUMNS = ("method", "r", "alpha", "dropout", "target_modules", "target_modules_resolved", "quantization",
                 "double_quant", "compute_dtype", "lr", "batch_size", "grad_accum", "seed", "model", "model_path",
                 "task", "train_size", "max_length", "task_type",
                 # which rows a run was scored on: only runs that agree are compared row by row
                 *(record.row_ids_hash_param(split) for split in record.ROW_SPLITS))


def trial_table(client, parent) -> pd.DataFrame:
    """One row per child run: params, final metrics, status tag, MLflow ids."""
    runs = tracking.child_runs(client, parent.info.experiment_id, parent.info.run_id)
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name,
               "mlflow_status": run.info.status,
               "status": run.data.tags.get(record.STATUS, "unknown"),
               "error": run.data.tags.get(record.ERROR, ""),
               "arm": run.data.tags.get(record.ARM, run.info.run_name),
               "artifact_uri": run.info.artifact_uri,
               "pruned_at_step": run.data.tags.get(record.PRUNED_AT_STEP, ""),
               "gpu_share": run.data.tags.get(record.GPU_SHARE)}
        for name in PARAM_COLUMNS:
            row[name] = run.data.params.get(name)
        row.update(run.data.metrics)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for col in ("r", "alpha", "lr", "seed", "gpu_share"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame.sort_values(["arm", "seed"]).reset_index(drop=True)


def sweep_metric(parent, trials: pd.DataFrame, requested: str) -> str:
    """The bare metric to compare a sweep's arms by: `requested` (the configured task's) when its trials
    logged it, else the one the sweep itself ranked by (its parent run's `metric` param, e.g. val_rougeL).
    `peftsweep report` without the sweep's `task=...` then still reads an sft sweep by its own metric."""
    if record.metric_key("test", requested) in trials:
        return requested
    ranked = parent.data.params.get("metric", "")
    bare = ranked.split("_", 1)[1] if "_" in ranked else ranked
    return bare if bare and record.metric_key("test", bare) in trials else requested


def full_ft_arm(trials: pd.DataFrame, metric: str) -> str | None:
    """The full fine-tuning arm every other arm is compared with: with several (another learning rate), the
    best on validation, the one a user would keep; None when none finished. One choice for deltas,
    intervals, verdicts and promotion alike."""
    full = trials[(trials["status"] == "ok") & (trials["method"] == "full")]
    col = record.metric_key("val", metric)
    if full.empty:
        return None
    if col not in full or full[col].isna().all():
        return full["arm"].iloc[0]
    means = full.groupby("arm")[col].mean()
    return means.idxmax() if record.metric_mode(metric) == "max" else means.idxmin()


def racing_spent(parent, trials: pd.DataFrame) -> dict | None:
    """What seed racing spent (sweeps/racing.py): trials run against the grid of max_seeds seeds an arm it
    replaced, and the seeds each arm got; None when the sweep did not race."""
    if parent.data.params.get("racing") != "True":
        return None
    grid = parent.data.metrics.get("racing_grid_trials")
    return {"trials": len(trials), "grid_trials": None if grid is None else int(grid),
            "max_seeds": int(parent.data.params.get("max_seeds", 0)), "seeds": seeds_by_arm(trials)}


def seeds_by_arm(trials: pd.DataFrame) -> dict:
    """{arm: the seeds its trials ran, sorted}."""
    return trials.groupby("arm")["seed"].apply(lambda s: sorted(int(x) for x in s.dropna())).to_dict()
