"""Run a sweep: validate every trial, open the MLflow parent run, schedule trials with Ray Tune, and
leave no MLflow run RUNNING whatever happens to the trials."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from sweeps import space
from sweeps.config import SweepConfig, as_dict
from sweeps.plan import Plan, build_plan
from trainers import record, tracking
from trainers.config import ConfigError
from trainers.tracking import absolute_uri, client

WORKER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error",
              "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}


def _storage(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def _init_ray(cfg: SweepConfig):
    import ray

    os.environ.update(WORKER_ENV)
    c = cfg.cluster
    kwargs = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": True,
              "configure_logging": True, "logging_level": "warning"}
    if c.address:
        return ray.init(address=c.address, **kwargs)
    if c.object_store_memory_mb:
        kwargs["object_store_memory"] = c.object_store_memory_mb * 1024 ** 2
    if c.include_dashboard is not None:
        kwargs["include_dashboard"] = c.include_dashboard
    return ray.init(num_cpus=c.num_cpus, num_gpus=c.num_gpus, **kwargs)


def _scheduler(cfg: SweepConfig):
    if cfg.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr=record.STEP, max_t=cfg.scheduler.max_t,
                             grace_period=cfg.scheduler.grace_period,
                             reduction_factor=cfg.scheduler.reduction_factor)
    return None  # FIFO


def _searcher(cfg: SweepConfig):
    if cfg.searcher.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.search.seeds[0])
    return None  # BasicVariantGenerator: grid dims crossed, sampled dims drawn per grid point


def open_parent_run(cfg: SweepConfig, sweep_id: str, n_trials: int) -> tuple[str, str]:
    params = {"sweep_id": sweep_id, "model": cfg.trial.model.name, "task": cfg.trial.task.name,
              "search": cfg.search.name, "searcher": cfg.searcher.name, "scheduler": cfg.scheduler.name,
              "n_trials": n_trials, "seeds": ",".join(map(str, cfg.search.seeds)),
              "metric": cfg.metric, "search_space": json.dumps(cfg.search.space)}
    return tracking.open_sweep_run(cfg.trial.tracking, sweep_id, params, yaml.safe_dump(as_dict(cfg), sort_keys=False))


def _prune_recorder(cfg: SweepConfig):
    """Tune callback: a trial the scheduler stopped before it could record `pruned` itself (its actor was
    ended between reports) is tagged pruned, at the last step it reported."""
    from ray.tune import Callback

    class PruneRecorder(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            run_id = last.get("mlflow_run_id")
            if run_id and last.get("status") != "ok":
                tracking.mark_pruned(client(cfg.trial.tracking), run_id, last.get(record.STEP, ""))

    return PruneRecorder()


def _trainable(cfg: SweepConfig, plan: Plan, skip_finished: bool = False):
    from ray import tune

    from sweeps.packing import resources_fn
    from sweeps.trainable import ray_trial

    return tune.with_resources(
        tune.with_parameters(ray_trial, plan=plan, cpus=cfg.cluster.cpus_per_trial, skip_finished=skip_finished),
        resources_fn(cfg.cluster, plan))


def run_sweep(cfg: SweepConfig, plan: Plan | None = None) -> dict:
    """Launch the sweep; returns {sweep_id, parent_run_id, experiment_id, n_trials, n_errors}."""
    from ray import tune

    plan = plan or build_plan(cfg)
    cfg.trial.tracking.uri = absolute_uri(cfg.trial.tracking.uri)
    sweep_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_id, parent = open_parent_run(cfg, sweep_id, len(plan.trials))
    cfg.trial.tracking.parent_run_id, cfg.trial.tracking.sweep_id = parent, sweep_id
    plan.bind_tracking(cfg.trial.tracking)

    def make_tuner():
        return tune.Tuner(
            _trainable(cfg, plan),
            param_space=space.param_space(cfg.search, cfg.searcher.name, plan.order),
            tune_config=tune.TuneConfig(
                metric=cfg.metric, mode=cfg.search.mode, scheduler=_scheduler(cfg),
                search_alg=_searcher(cfg), num_samples=cfg.search.num_samples,
                max_concurrent_trials=cfg.cluster.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=sweep_id, storage_path=_storage(cfg.cluster.storage_path),
                failure_config=tune.FailureConfig(max_failures=cfg.cluster.max_failures, fail_fast=False),
                verbose=1, callbacks=[_prune_recorder(cfg)]))

    return _drive(cfg, sweep_id, exp_id, parent, make_tuner)


def resume_sweep(cfg: SweepConfig, sweep_id: str | None) -> dict:
    """Finish a sweep whose driver died: same config and parent run (read back from MLflow), Ray Tune's
    saved experiment state; finished trials are kept, unfinished ones start again as new runs."""
    from ray import tune

    from sweeps.config import sweep_config_from_dict

    c = client(cfg.trial.tracking)
    parent_run = tracking.find_parent(c, cfg.trial.tracking.experiment, sweep_id)
    sweep_id = parent_run.data.tags[record.SWEEP_ID]
    cfg = sweep_config_from_dict(yaml.safe_load(tracking.saved_sweep_config(c, parent_run)))
    cfg.trial.tracking.parent_run_id, cfg.trial.tracking.sweep_id = parent_run.info.run_id, sweep_id
    exp_id = parent_run.info.experiment_id
    path = os.path.join(_storage(cfg.cluster.storage_path), sweep_id)
    if not tune.Tuner.can_restore(path):
        raise ConfigError(f"sweep {sweep_id} has no restorable Ray Tune state at {path}")
    plan = build_plan(cfg)  # the same plan (and so the same arm labels) as the first run's
    plan.bind_tracking(cfg.trial.tracking)
    tracking.close_orphans(c, exp_id, parent_run.info.run_id, "sweep driver died while this trial ran; "
                                                              "restarted by peftsweep sweep --resume")
    tracking.write_status(c, parent_run.info.run_id, "running")
    return _drive(cfg, sweep_id, exp_id, parent_run.info.run_id, lambda: tune.Tuner.restore(
        path, trainable=_trainable(cfg, plan, skip_finished=True), resume_unfinished=True, resume_errored=False,
        restart_errored=False, param_space=space.param_space(cfg.search, cfg.searcher.name, plan.order)))


def _drive(cfg: SweepConfig, sweep_id: str, exp_id: str, parent: str, make_tuner) -> dict:
    """Run the tuner; whatever happens, close orphaned trial runs and record the parent's outcome."""
    outcome, error = "FAILED", None
    try:
        _init_ray(cfg)
        grid = make_tuner().fit()
        errors = sum(1 for r in grid if r.error)
        outcome = "FINISHED"
        return {"sweep_id": sweep_id, "parent_run_id": parent, "experiment_id": exp_id,
                "n_trials": len(grid), "n_errors": errors}
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        c = client(cfg.trial.tracking)
        tracking.close_orphans(c, exp_id, parent, "trial process ended without recording an outcome "
                                                  f"(sweep {'finished' if error is None else 'interrupted'})")
        tracking.write_status(c, parent, "ok" if outcome == "FINISHED" else "failed", error,
                              mlflow_status=outcome if error is None else "KILLED")
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
