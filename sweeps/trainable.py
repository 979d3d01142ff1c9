"""The Ray Tune trainable: looks up its planned trial (the plan travels with the trainable, computed once
by the driver) and hands it to `trainers`. Ray's only part in a trial is here."""
from __future__ import annotations

import os


def ray_trial(params: dict, plan, cpus: float, skip_finished: bool = False, metric: str | None = None) -> None:
    import ray
    from ray import tune

    from trainers import StopTrial, record, run_trial_with_oom_retries, trial_config_from_dict
    from trainers.config import trial_config_to_dict
    from trainers.tracking import finished_twin

    drawn = {k: v for k, v in params.items() if k not in ("arm", "seed")}
    trial = plan.trial_dict(params["arm"], params["seed"], drawn)
    cfg = trial_config_from_dict(trial)
    if skip_finished:  # --resume: Ray's saved state may lag a trial that finished just before the crash
        twin = finished_twin(cfg.tracking, record.trial_key(trial_config_to_dict(cfg)))
        if twin is not None:
            tune.report({**twin.data.metrics, "status": "ok", "mlflow_run_id": twin.info.run_id, "reused": 1})
            return

    def report(metrics: dict) -> None:
        # A scheduler (ASHA) stops a trial by exiting its thread inside tune.report; the trainer's contract
        # for "the scheduler stopped you" is StopTrial, which its run records as `pruned` at this step.
        if metric and metric not in metrics:
            return  # an sft eval pass (loss only) when the sweep ranks by a generation metric: Ray would refuse it
        try:
            tune.report(metrics)
        except SystemExit:
            raise StopTrial(int(metrics.get(record.STEP, -1))) from None

    context = ray.get_runtime_context()
    placement = {record.RAY_NODE: context.get_node_id(), record.RAY_TRIAL_ID: tune.get_context().get_trial_id(),
                 # which GPU(s) Ray gave the trial, and the share it reserved: audit packing from MLflow
                 record.CUDA_VISIBLE_DEVICES: os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                 record.GPU_SHARE: str(context.get_assigned_resources().get("GPU", 0))}
    result = run_trial_with_oom_retries(cfg, report=report, num_threads=max(1, int(cpus)), tags=placement,
                                        arm=plan.label_of(params["arm"], trial))
    if result["status"] == "pruned":
        raise SystemExit(0)  # what Ray's own stop does: end the trial thread quietly
