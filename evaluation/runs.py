"""A sweep as MLflow holds it: the parent run and a table of its child runs (one row per trial)."""
from __future__ import annotations

import pandas as pd

from trainers import record

PARAM_COLUMNS = ("method", "r", "alpha", "target_modules", "target_modules_resolved", "quantization",
                 "double_quant", "compute_dtype", "lr", "seed", "model", "model_path", "task", "train_size")


def find_parent(client, experiment: str, sweep_id: str | None = None):
    """The parent run of `sweep_id`, or of the newest sweep in `experiment`."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} in this tracking store")
    flt = f"tags.`{record.ROLE}` = 'sweep'"
    if sweep_id:
        flt += f" and tags.`{record.SWEEP_ID}` = '{sweep_id}'"
    runs = client.search_runs([exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise LookupError(f"no sweep {sweep_id!r} in experiment {experiment!r}" if sweep_id
                          else f"no sweep in experiment {experiment!r}: run `peftsweep sweep` first")
    return runs[0]


def trial_table(client, parent) -> pd.DataFrame:
    """One row per child run: params, final metrics, status tag, MLflow ids."""
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{record.PARENT_RUN_ID}` = '{parent.info.run_id}'",
                              max_results=5000)
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
