"""The Ray Tune trainable: turns a sampled point into a trial config and hands it to `trainers`."""
from __future__ import annotations

from trainers.config import trial_config_from_dict


def trial_dict_for(params: dict, base: dict, search) -> dict:
    from sweeps.space import labelled_arms, resolve_trial

    sampled = {k: v for k, v in params.items() if k not in ("arm", "seed")}
    return resolve_trial(base, search, labelled_arms(search, base)[params["arm"]], params["seed"], sampled)


def finished_twin(cfg) -> dict | None:
    """Metrics of a run of this exact configuration that already finished ok in this sweep, if any."""
    from trainers import record
    from trainers.config import trial_config_to_dict
    from trainers.tracking import client, experiment_id

    key = record.trial_key(trial_config_to_dict(cfg))
    runs = client(cfg.tracking).search_runs(
        [experiment_id(cfg.tracking)],
        filter_string=f"tags.`{record.PARENT_RUN_ID}` = '{cfg.tracking.parent_run_id}' and "
                      f"tags.`{record.TRIAL_KEY}` = '{key}' and tags.`{record.STATUS}` = 'ok'", max_results=1)
    if not runs:
        return None
    return {**runs[0].data.metrics, "status": "ok", "mlflow_run_id": runs[0].info.run_id, "reused": 1}


def ray_trial(params: dict, base: dict, search, cpus: float, skip_finished: bool = False) -> None:
    from ray import tune

    from trainers.trial import run_trial_with_oom_retries

    from trainers.loop import StopTrial

    cfg = trial_config_from_dict(trial_dict_for(params, base, search))
    if skip_finished:  # --resume: Ray's saved state may lag a trial that finished just before the crash
        twin = finished_twin(cfg)
        if twin is not None:
            tune.report(twin)
            return

    def report(metrics: dict) -> None:
        # A scheduler (ASHA) stops a trial by exiting its thread inside tune.report; turn that into a
        # StopTrial so the trainer records `pruned` at this step before the thread ends.
        try:
            tune.report(metrics)
        except SystemExit:
            raise StopTrial(int(metrics.get("step", -1))) from None

    import ray

    from trainers import record

    import os

    placement = {record.RAY_NODE: ray.get_runtime_context().get_node_id(),
                 record.RAY_TRIAL_ID: tune.get_context().get_trial_id(),
                 # which GPU(s) Ray gave the trial, and the share it reserved: audit packing from MLflow
                 record.CUDA_VISIBLE_DEVICES: os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                 record.GPU_SHARE: str(ray.get_runtime_context().get_assigned_resources().get("GPU", 0))}
    result = run_trial_with_oom_retries(cfg, report=report, num_threads=max(1, int(cpus)), tags=placement)
    if result["status"] == "pruned":
        raise SystemExit(0)  # what Ray's own stop does: end the trial thread quietly
