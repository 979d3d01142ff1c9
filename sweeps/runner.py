"""Run a sweep: validate every trial, open the MLflow parent run, schedule trials with Ray Tune, and
leave no MLflow run RUNNING whatever happens to the trials."""
from __future__ import annotations

import json
import os
import signal
import threading
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


def check_store(cfg: SweepConfig) -> None:
    """A tracking store that cannot be reached or opened now is bad input: refused in seconds with one line,
    before Ray starts (outage tolerance is for a store that was there and went away)."""
    from trainers.validate import tracking_problem

    problem = tracking_problem(cfg.trial.tracking)
    if problem:
        raise ConfigError(problem)


def _storage(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


# Ray's single-machine mode: the node's address is 127.0.0.1, so GCS, raylet, object manager, workers and
# dashboard listen on loopback only (an exposed Ray runs anyone's jobs: CVE-2023-48022). Ray reads the
# variable once at import, so the driver also sets the constant it became; a cluster never sees either.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray's memory monitor kills a worker near the node's limit with an error Tune does not expect: the whole
# sweep dies (measured: a DoRA trial at 15 GB beside another on a 24 GB node). The kernel's OOM killer takes
# the same worker instead (Ray makes workers its first victims), which Tune sees as one failed trial, as with
# any killed trial process. On a local machine the plan's memory requests keep it from coming to that.
_MEMORY_MONITOR_ENV = "RAY_memory_monitor_refresh_ms"


def _init_ray(cfg: SweepConfig):
    import ray

    os.environ.update(WORKER_ENV)
    c = cfg.cluster
    kwargs = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": True,
              "configure_logging": True, "logging_level": "warning"}
    if c.address:
        return ray.init(address=c.address, **kwargs)
    from ray._private import ray_constants

    os.environ[_LOOPBACK_ENV] = "0"
    os.environ[_MEMORY_MONITOR_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    from sweeps.packing import HOST_MEMORY_RESOURCE, host_memory_mb

    # trials reserve their predicted peak RSS of it, so Ray never starts two that cannot fit side by side
    kwargs["resources"] = {HOST_MEMORY_RESOURCE: host_memory_mb()}
    if c.object_store_memory_mb:
        kwargs["object_store_memory"] = c.object_store_memory_mb * 1024 ** 2
    if c.include_dashboard is not None:
        kwargs["include_dashboard"] = c.include_dashboard
    return ray.init(num_cpus=c.num_cpus, num_gpus=c.num_gpus, dashboard_host="127.0.0.1", **kwargs)


def _own_processes() -> set:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _started_by_ray(before: set | None) -> list:
    import psutil

    return [] if before is None else [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def _trial_workers(before: set | None) -> list:
    """Ray's worker processes (trials run in them), not its GCS, raylet or agents."""
    import psutil

    out = []
    for proc in _started_by_ray(before):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and not title.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
            out.append(proc)
    return out


def _kill(procs: list) -> None:
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def _shutdown_ray(before: set | None) -> None:
    """Stop Ray, then end any process it started that outlived it: a trial worker can run on after its
    raylet dies, finish, and overwrite the run the driver is about to close."""
    import psutil

    started = _started_by_ray(before)
    try:
        import ray
        from ray._private import ray_constants

        ray.shutdown()
        os.environ.pop(_LOOPBACK_ENV, None)
        os.environ.pop(_MEMORY_MONITOR_ENV, None)
        ray_constants.ENABLE_RAY_CLUSTER = True  # Linux's own default: the next init may join a cluster
    except Exception:  # noqa: BLE001
        pass
    _, alive = psutil.wait_procs(started, timeout=5)
    _kill(alive)


class SweepStopped(BaseException):
    """The driver was told to stop (SIGTERM from Kubernetes, Slurm, systemd or CI; SIGINT from Ctrl-C)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class _StopOnSignals:
    """SIGTERM and SIGINT stop the sweep at once: the signal unwinds Ray Tune's loop, Ray is shut down (its
    trials with it), every open run is closed as `failed` with the signal named, and the driver exits
    128 + signal. Ray Tune's own first-Ctrl-C stop waits for running trials to report, which a long trial
    may not do before a Kubernetes grace period ends. Ray Tune's periodic experiment snapshot lets
    `--resume` continue the sweep. The handlers stay until every run is closed: a signal while closing is
    noted, not raised (closing takes seconds), except a second Ctrl-C, which stops at once; `--resume`
    closes whatever that leaves open."""

    def __init__(self):
        self.signum = None
        self.closing = False
        self.before = None  # this process's children before ray.init: not Ray's

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.closing:
            self.signum = self.signum or signum
            print(f"\npeftsweep: {signal.Signals(signum).name} received: closing the sweep's runs first "
                  "(Ctrl-C again to stop at once)", flush=True)
            return
        if self.signum is not None:
            return
        self.signum = signum
        print(f"\npeftsweep: {signal.Signals(signum).name} received: stopping the sweep and closing its runs",
              flush=True)
        _kill(_trial_workers(self.before))  # or Ray Tune's clean-up waits for them to finish their trials
        raise SweepStopped(signum)

    def install(self) -> None:
        """Also after ray.init, which installs Ray's own SIGTERM handler (a stack dump, then abort). Only
        the main thread may set handlers: a sweep started from another thread (a notebook's) keeps Ray's."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, self._handle)

    def __enter__(self):
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours decides; Tune's would wait for every trial
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        self.install()
        return self

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            for s, handler in self.previous.items():
                signal.signal(s, handler)
        return False


def _scheduler(cfg: SweepConfig):
    if cfg.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr=record.STEP, max_t=cfg.scheduler.max_t,
                             grace_period=cfg.scheduler.grace_period,
                             reduction_factor=cfg.scheduler.reduction_factor)
    return None  # FIFO


def _reuse_processes(cfg: SweepConfig) -> bool:
    """cluster.reuse_processes, where every trial ends by returning (FIFO). A trial ASHA stops is still
    recording itself as pruned when Tune hands its process to the next trial; Tune gives the handover 2 s
    (TUNE_FUNCTION_THREAD_TIMEOUT_S), and with reuse on, 2 of an ASHA sweep's 6 trials left no run at all."""
    return cfg.cluster.reuse_processes and cfg.scheduler.name == "fifo"


def _searcher(cfg: SweepConfig, plan: Plan, parent: str):
    if cfg.search.racing:  # arms and seeds come from the race (sweeps/racing.py); it reads the parent's runs
        from sweeps.racing import racer

        return racer(cfg, plan, parent)
    if cfg.searcher.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.search.seeds[0])
    return None  # BasicVariantGenerator: grid dims crossed, sampled dims drawn per grid point


def _param_space(cfg: SweepConfig, plan: Plan) -> dict:
    # racing: the searcher hands out every trial's arm and seed, and nothing is sampled (sweeps.config
    # racing_problem), so Ray's own space is empty; a restore must pass the same as the first run
    return {} if cfg.search.racing else space.param_space(cfg.search, cfg.searcher.name, list(plan.ray_ids))


def _planned_trials(cfg: SweepConfig, plan: Plan) -> int:
    """The trials the sweep runs, or under racing the most it can (every arm at max_seeds)."""
    if cfg.search.racing:
        from sweeps.plan import worst_case

        return worst_case(cfg, plan)
    return len(plan.trials)


def open_parent_run(cfg: SweepConfig, sweep_id: str, n_trials: int) -> tuple[str, str]:
    source = cfg.trial.task.source
    # `name` is the registered model's name at promotion (sweeps.config.sweep_name); the data it was fitted on
    # is named beside the task, whose own data it need not be
    params = {"sweep_id": sweep_id, "name": cfg.name, "model": cfg.trial.model.name, "task": cfg.trial.task.name,
              "data_source": source.path, "data_format": source.format,
              "search": cfg.search.name, "searcher": cfg.searcher.name, "scheduler": cfg.scheduler.name,
              "n_trials": n_trials, "seeds": ",".join(map(str, cfg.search.seeds)),
              "metric": cfg.metric, "search_space": json.dumps(cfg.search.space),
              "racing": cfg.search.racing, "max_seeds": cfg.search.max_seeds}
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
        tune.with_parameters(ray_trial, plan=plan, cpus=cfg.cluster.cpus_per_trial, skip_finished=skip_finished,
                             metric=cfg.metric, cluster=cfg.cluster, storage=_storage(cfg.cluster.storage_path)),
        resources_fn(cfg.cluster, plan))


def run_sweep(cfg: SweepConfig, plan: Plan | None = None) -> dict:
    """Launch the sweep; returns {sweep_id, parent_run_id, experiment_id, n_trials, n_errors}."""
    from ray import tune

    check_store(cfg)
    plan = plan or build_plan(cfg)
    cfg.trial.tracking.uri = absolute_uri(cfg.trial.tracking.uri)
    sweep_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_id, parent = open_parent_run(cfg, sweep_id, _planned_trials(cfg, plan))
    cfg.trial.tracking.parent_run_id, cfg.trial.tracking.sweep_id = parent, sweep_id
    plan.bind_tracking(cfg.trial.tracking)
    count = (f"seed racing, {len(plan.arms)} trials first, at most {_planned_trials(cfg, plan)}" if cfg.search.racing
             else f"{len(plan.trials)} trials")
    print(f"Sweep {sweep_id}: {count}. Arms (Ray's table shows the id):\n{plan.legend()}", flush=True)

    def make_tuner():
        return tune.Tuner(
            _trainable(cfg, plan),
            param_space=_param_space(cfg, plan),
            tune_config=tune.TuneConfig(
                metric=cfg.metric, mode=cfg.mode, scheduler=_scheduler(cfg),
                # racing: Tune asks the racer for trials until it says FINISHED, at most the worst case
                search_alg=_searcher(cfg, plan, parent),
                num_samples=_planned_trials(cfg, plan) if cfg.search.racing else cfg.search.num_samples,
                max_concurrent_trials=cfg.cluster.max_concurrent_trials,
                reuse_actors=_reuse_processes(cfg)),
            run_config=tune.RunConfig(
                name=sweep_id, storage_path=_storage(cfg.cluster.storage_path),
                failure_config=tune.FailureConfig(max_failures=cfg.cluster.max_failures, fail_fast=False),
                # trial checkpoints (train.checkpoint_every_steps): the newest K of each trial are kept
                checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.trial.train.keep_checkpoints),
                verbose=1, callbacks=[_prune_recorder(cfg)]))

    return _drive(cfg, sweep_id, exp_id, parent, make_tuner, _racing_spent(cfg, plan, parent))


def _racing_spent(cfg: SweepConfig, plan: Plan, parent: str):
    """After fit: the trials a race ran against its worst case, on the parent run (None without racing)."""
    if not cfg.search.racing:
        return None
    from sweeps.racing import log_spent

    return lambda grid: log_spent(client(cfg.trial.tracking), parent, len(grid), _planned_trials(cfg, plan))


def resume_sweep(cfg: SweepConfig, sweep_id: str | None) -> dict:
    """Finish a sweep whose driver died: same config and parent run (read back from MLflow), Ray Tune's
    saved experiment state; finished trials are kept, unfinished ones start again as new runs."""
    from ray import tune

    from sweeps.config import sweep_config_from_dict

    check_store(cfg)
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
    # a racing sweep's SeedRacer comes back inside the restored Tuner (Tune pickled it into tuner.pkl), its
    # race where Tune's last experiment snapshot left it (its save/restore): queued seeds, running trials, rounds
    return _drive(cfg, sweep_id, exp_id, parent_run.info.run_id, lambda: tune.Tuner.restore(
        path, trainable=_trainable(cfg, plan, skip_finished=True), resume_unfinished=True, resume_errored=False,
        restart_errored=False, param_space=_param_space(cfg, plan)),
        _racing_spent(cfg, plan, parent_run.info.run_id))


def _drive(cfg: SweepConfig, sweep_id: str, exp_id: str, parent: str, make_tuner, after_fit=None) -> dict:
    """Run the tuner; whatever happens (a signal included), stop Ray, then close the trial runs it left open
    and record the parent's outcome: no run is left RUNNING."""
    stop = _StopOnSignals()
    with stop:
        return _drive_under(stop, cfg, sweep_id, exp_id, parent, make_tuner, after_fit)


def _drive_under(stop: "_StopOnSignals", cfg: SweepConfig, sweep_id: str, exp_id: str, parent: str,
                 make_tuner, after_fit=None) -> dict:
    outcome, error, reason = "FAILED", None, "trial process ended without recording an outcome"
    try:
        stop.before = _own_processes()
        _init_ray(cfg)
        stop.install()
        grid = make_tuner().fit()
        if after_fit is not None:
            after_fit(grid)
        errors = sum(1 for r in grid if r.error)
        outcome = "FINISHED"
        return {"sweep_id": sweep_id, "parent_run_id": parent, "experiment_id": exp_id,
                "n_trials": len(grid), "n_errors": errors}
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        if stop.signum is not None:
            # raised inside Ray's Cython calls the stop may surface wrapped (SystemError): it is still the stop
            error = reason = str(SweepStopped(stop.signum))
            raise SweepStopped(stop.signum) from None
        if isinstance(exc, KeyboardInterrupt):
            error = reason = "stopped by SIGINT"
        raise
    finally:
        stop.closing = True
        _shutdown_ray(stop.before)  # before closing runs: no trial may write after its run is closed
        c = client(cfg.trial.tracking)
        tracking.close_orphans(c, exp_id, parent, f"{reason} (sweep {'finished' if error is None else 'interrupted'})")
        tracking.write_status(c, parent, "ok" if outcome == "FINISHED" else "failed", error,
                              mlflow_status=outcome if error is None else "KILLED")
