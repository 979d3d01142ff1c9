"""The Ray Tune trainable: looks up its planned trial (the plan travels with the trainable, computed once
by the driver) and hands it to `trainers`. Ray's only part in a trial is here.

A trial on one worker trains in the Tune trial's own process. A trial on N > 1 workers (train.workers) is a Ray
Train run inside the Tune trial: a TorchTrainer gang-schedules N workers (all or none), each runs the same
`run_trial` on its slice of every batch, and rank 0's reports reach Tune through TuneReportCallback, so
schedulers and searchers see one trial. Checkpoints (train.checkpoint_every_steps) go through Ray's checkpoint
API either way: a trial Ray restarts (cluster.max_failures, `peftsweep sweep --resume`) continues from its last.
"""
from __future__ import annotations

import os
import tempfile


_trials_started_here = 0  # in this process: a slot's process runs several with cluster.reuse_processes


def ray_trial(params: dict, plan, cpus: float, skip_finished: bool = False, metric: str | None = None,
              cluster=None, storage: str | None = None) -> None:
    """`cluster`: the sweep's ClusterConfig (a multi-worker trial's resources and retries); `storage`: where
    Ray keeps state and checkpoints, resolved by the driver."""
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

    global _trials_started_here
    context = ray.get_runtime_context()
    placement = {record.RAY_NODE: context.get_node_id(), record.RAY_TRIAL_ID: tune.get_context().get_trial_id(),
                 record.TRIALS_BEFORE_IN_PROCESS: str(_trials_started_here),
                 # which GPU(s) Ray gave the trial, and the share it reserved: audit packing from MLflow
                 record.CUDA_VISIBLE_DEVICES: os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                 record.GPU_SHARE: str(context.get_assigned_resources().get("GPU", 0))}
    _trials_started_here += 1
    arm = plan.label_of(params["arm"], trial)
    if cfg.train.workers != 1:
        return _on_workers(cfg, arm, placement, cpus, cluster, storage, metric)

    def report(metrics: dict, save_state=None) -> None:
        # A scheduler (ASHA) stops a trial by exiting its thread inside tune.report; the trainer's contract
        # for "the scheduler stopped you" is StopTrial, which its run records as `pruned` at this step.
        if metric and metric not in metrics:
            return  # an sft eval pass (loss only) when the sweep ranks by a generation metric: Ray would refuse it
        try:
            _report(tune.report, metrics, save_state)
        except SystemExit:
            raise StopTrial(int(metrics.get(record.STEP, -1))) from None

    with _last_checkpoint(tune.get_checkpoint()) as resume_from:
        result = run_trial_with_oom_retries(cfg, report=report, num_threads=max(1, int(cpus)), tags=placement,
                                            arm=arm, resume_from=resume_from)
    if result["status"] == "pruned":
        raise SystemExit(0)  # what Ray's own stop does: end the trial thread quietly


def _report(send, metrics: dict, save_state) -> None:
    """`send` (tune.report or ray.train.report) the metrics, with the checkpoint `save_state` writes, if any."""
    from ray.train import Checkpoint

    if save_state is None:
        send(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="peftsweep-ckpt-") as folder:
        save_state(folder)
        send(metrics, checkpoint=Checkpoint.from_directory(folder))  # copied to storage before it returns


class _last_checkpoint:
    """The folder of a Ray checkpoint (None: start from step 0), for the length of the trial."""

    def __init__(self, checkpoint):
        self.checkpoint, self.context = checkpoint, None

    def __enter__(self):
        if self.checkpoint is None:
            return None
        self.context = self.checkpoint.as_directory()
        return self.context.__enter__()

    def __exit__(self, *exc):
        return self.context.__exit__(*exc) if self.context is not None else False


def _on_workers(cfg, arm: str, placement: dict, cpus: float, cluster, storage: str | None,
                metric: str | None) -> None:
    """The trial as a Ray Train run of cfg.train.workers workers, named after the Tune trial, so a restarted
    trial (or a resumed sweep) finds the run's checkpoints in storage and continues from the newest."""
    from ray import train, tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def per_worker(_config) -> None:
        from trainers import run_trial

        def report(metrics: dict, save_state=None) -> None:
            if metric and metric not in metrics:
                return  # every rank skips the same reports: Ray Train's report is collective
            _report(train.report, {k: v for k, v in metrics.items() if v is not None}, save_state)

        with _last_checkpoint(train.get_checkpoint()) as resume_from:
            run_trial(cfg, report=report, num_threads=max(1, int(cpus)), arm=arm, resume_from=resume_from,
                      tags=placement)

    # a trial spans workers when it does not fit one device: each worker takes a whole GPU under "auto"
    gpus = (1 if cluster.gpus_per_trial == "auto" else cluster.gpus_per_trial) if cluster is not None else 0
    trainer = TorchTrainer(
        per_worker,
        scaling_config=train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=bool(gpus),
                                           resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
        run_config=train.RunConfig(
            name=tune.get_context().get_trial_id(), storage_path=storage,
            failure_config=train.FailureConfig(max_failures=cluster.max_failures if cluster else 0),
            checkpoint_config=train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[TuneReportCallback()]))
    trainer.fit()

