"""Run a sweep: validate every trial, open the MLflow parent run, schedule trials with Ray Tune, and
leave no MLflow run RUNNING whatever happens to the trials."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from sweeps import space
from sweeps.config import SweepConfig, as_dict, trial_dict
from trainers import record
from trainers.config import ConfigError, trial_config_from_dict
from trainers.tracking import absolute_uri, client, experiment_id, git_commit, redact

WORKER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error",
              "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}


def plan_trials(cfg: SweepConfig) -> list:
    """Every trial the sweep would start, as TrialConfigs, each validated; raises one ConfigError that
    lists every problem (the caller prints it and exits 2 before Ray starts)."""
    from trainers.validate import validate_trial

    trials = [trial_config_from_dict(t) for t in space.expand(cfg.search, trial_dict(cfg))]
    problems = []
    for t in trials:
        for p in validate_trial(t):
            if p not in problems:
                problems.append(p)
    if cfg.cluster.gpus_per_trial == "auto" and not problems:
        from sweeps.packing import gpu_capacity_gb, trial_gpu_request

        for t in trials:
            fraction, predicted = trial_gpu_request(dataclasses.asdict(t), cfg.cluster)
            if fraction > 1:
                problems.append(f"{t.model.name} {t.method.name} r={t.method.r}: predicted peak {predicted:.1f} GB "
                                f"does not fit one GPU ({gpu_capacity_gb(cfg.cluster):.0f} GB x "
                                f"{cfg.cluster.gpu_headroom} headroom); lower train.batch_size or use quant=nf4")
    if problems:
        raise ConfigError("\n".join(problems))
    return trials


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
    tracking = cfg.trial.tracking
    c = client(tracking)
    exp_id = experiment_id(tracking)
    run = c.create_run(exp_id, run_name=sweep_id, tags={
        record.ROLE: "sweep", record.SWEEP_ID: sweep_id, record.STATUS: "running",
        record.GIT_COMMIT: git_commit()})
    params = {"sweep_id": sweep_id, "model": cfg.trial.model.name, "task": cfg.trial.task.name,
              "search": cfg.search.name, "searcher": cfg.searcher.name, "scheduler": cfg.scheduler.name,
              "n_trials": n_trials, "seeds": ",".join(map(str, cfg.search.seeds)),
              "metric": cfg.metric, "search_space": json.dumps(cfg.search.space)}
    for k, v in params.items():
        c.log_param(run.info.run_id, k, redact(v)[:6000])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep_config.yaml"
        path.write_text(redact(yaml.safe_dump(as_dict(cfg), sort_keys=False)))
        c.log_artifact(run.info.run_id, str(path))
    return exp_id, run.info.run_id


def close_orphans(cfg: SweepConfig, parent_run_id: str, exp_id: str, reason: str) -> int:
    """Child runs still RUNNING belong to trials whose process died (killed, OOM-killed, pruned by Ray
    while training): say so instead of leaving them RUNNING forever."""
    c = client(cfg.trial.tracking)
    orphans = c.search_runs([exp_id], filter_string=f"tags.`{record.PARENT_RUN_ID}` = '{parent_run_id}' "
                                                    f"and attributes.status = 'RUNNING'")
    for run in orphans:
        c.set_tag(run.info.run_id, record.STATUS, "failed")
        c.set_tag(run.info.run_id, record.ERROR, reason)
        c.set_terminated(run.info.run_id, "KILLED")
    return len(orphans)


def _prune_recorder(cfg: SweepConfig):
    """Tune callback: a trial the scheduler stopped before it could record `pruned` itself (its actor was
    ended between reports) is tagged pruned, at the last step it reported."""
    from ray.tune import Callback

    class PruneRecorder(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            run_id = last.get("mlflow_run_id")
            if not run_id or last.get("status") == "ok":
                return
            c = client(cfg.trial.tracking)
            if c.get_run(run_id).info.status == "RUNNING":
                c.set_tag(run_id, record.STATUS, "pruned")
                c.set_tag(run_id, record.PRUNED_AT_STEP, str(last.get(record.STEP, "")))
                c.set_terminated(run_id, "FINISHED")

    return PruneRecorder()


def _trainable(cfg: SweepConfig, base: dict, skip_finished: bool = False):
    from ray import tune

    from sweeps.trainable import ray_trial

    from sweeps.packing import resources_fn

    return tune.with_resources(
        tune.with_parameters(ray_trial, base=base, search=cfg.search, cpus=cfg.cluster.cpus_per_trial,
                             skip_finished=skip_finished),
        resources_fn(cfg.cluster, base, cfg.search))


def run_sweep(cfg: SweepConfig) -> dict:
    """Launch the sweep; returns {sweep_id, parent_run_id, experiment_id, n_trials, n_errors}."""
    from ray import tune

    trials = plan_trials(cfg)
    cfg.trial.tracking.uri = absolute_uri(cfg.trial.tracking.uri)
    sweep_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_id, parent = open_parent_run(cfg, sweep_id, len(trials))
    cfg.trial.tracking.parent_run_id, cfg.trial.tracking.sweep_id = parent, sweep_id
    base = trial_dict(cfg)

    def make_tuner():
        return tune.Tuner(
            _trainable(cfg, base),
            param_space=space.param_space(cfg.search, cfg.searcher.name, base, space.longest_first(cfg.search, base)),
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

    from evaluation.runs import find_parent
    from sweeps.config import sweep_config_from_dict

    tracking = cfg.trial.tracking
    c = client(tracking)
    parent_run = find_parent(c, tracking.experiment, sweep_id)
    sweep_id = parent_run.data.tags[record.SWEEP_ID]
    with tempfile.TemporaryDirectory() as tmp:
        saved = yaml.safe_load(Path(c.download_artifacts(parent_run.info.run_id, "sweep_config.yaml", tmp)).read_text())
    cfg = sweep_config_from_dict(saved)
    cfg.trial.tracking.parent_run_id, cfg.trial.tracking.sweep_id = parent_run.info.run_id, sweep_id
    exp_id = parent_run.info.experiment_id
    path = os.path.join(_storage(cfg.cluster.storage_path), sweep_id)
    if not tune.Tuner.can_restore(path):
        raise ConfigError(f"sweep {sweep_id} has no restorable Ray Tune state at {path}")
    close_orphans(cfg, parent_run.info.run_id, exp_id, "sweep driver died while this trial ran; "
                                                     "restarted by peftsweep sweep --resume")
    c.set_tag(parent_run.info.run_id, record.STATUS, "running")
    base = trial_dict(cfg)
    return _drive(cfg, sweep_id, exp_id, parent_run.info.run_id, lambda: tune.Tuner.restore(
        path, trainable=_trainable(cfg, base, skip_finished=True), resume_unfinished=True, resume_errored=False,
        restart_errored=False,
        param_space=space.param_space(cfg.search, cfg.searcher.name, base, space.longest_first(cfg.search, base))))


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
        close_orphans(cfg, parent, exp_id, "trial process ended without recording an outcome "
                                           f"(sweep {'finished' if error is None else 'interrupted'})")
        c = client(cfg.trial.tracking)
        c.set_tag(parent, record.STATUS, "ok" if outcome == "FINISHED" else "failed")
        if error:
            c.set_tag(parent, record.ERROR, redact(error)[:5000])
        c.set_terminated(parent, outcome if error is None else "KILLED")
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
