"""The one MLflow module: every run that peftsweep writes or reads goes through here. A trial's child run
(RunRecorder, which runs in the trial's writer process: trainers/trial_run.py), the sweep's parent run,
orphaned and pruned runs, and the searches the report, promotion and --resume make. `write_status` is the
only writer of a run's outcome, so a run is never left RUNNING and its status always means the same thing.

Uses MlflowClient with explicit run ids (no global active run), so it is safe in Ray workers and in
processes that run several trials.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from trainers import record
from trainers.config import TrackingConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY)", re.I)
_SECRET_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{20,}"),  # Hugging Face tokens
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in URIs
    re.compile(r"(?i)(?<=token=)[^&\s]+"),
]


def redact(text: str) -> str:
    """Mask secrets before anything reaches params, tags or logs."""
    text = str(text)
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and value and len(value) >= 6:
            text = text.replace(value, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("***", text)
    return text


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db → an absolute path, so Ray workers (other cwd) hit the same store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def client(cfg: TrackingConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=absolute_uri(cfg.uri))


# MLflow 3's UI opens a GenAI experiment on traces; a model-training experiment opens on its runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(cfg: TrackingConfig) -> str:
    """Get or create the experiment; its artifact root is fixed at creation (local path → file URI)."""
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in exp.tags:  # made by an older peftsweep, or by hand
            c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = cfg.artifact_location
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    try:
        return c.create_experiment(cfg.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # noqa: BLE001 - another process created it first
        return c.get_experiment_by_name(cfg.experiment).experiment_id


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Each library's version; a loaded module's own `__version__` where it has one (reading package
    metadata scans every installed distribution: ~50 ms a library)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "mlflow", "ray"):
        loaded = getattr(sys.modules.get(lib), "__version__", None)
        try:
            out[lib] = str(loaded) if loaded else version(lib)
        except PackageNotFoundError:
            pass
    return out


# MLflow error codes that no amount of waiting fixes: deliver them to the caller at once.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
              "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_STATE"}


# A local file system refusing a write (an artifact folder on this machine in the way, read-only or full): no
# outage that waiting ends. Network failures are OSErrors too, but with other errnos or none: still transient.
_REFUSED_LOCALLY = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
                    errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def _transient(exc: Exception) -> bool:
    """Server down, timing out, answering 5xx, or a locked sqlite file: worth waiting for."""
    if isinstance(exc, OSError) and exc.errno in _REFUSED_LOCALLY:
        return False
    return getattr(exc, "error_code", None) not in _PERMANENT


class _Outbox:
    """Writes in order; what cannot be delivered now waits, in order, while the trial goes on training.
    Each metric keeps the timestamp and step it was logged with, so a late delivery changes nothing.
    A write refused for good, or still failing when a waiting flush gives up, is dropped (and kept in
    `undelivered`): left at the head it would hold back every write behind it, the run's outcome included."""

    def __init__(self, outage_timeout_s: float):
        self.pending: list[tuple] = []
        self.undelivered: list[str] = []  # the writes dropped, each as "what: why"
        self.outage_timeout_s = outage_timeout_s
        self.outage_since: float | None = None

    def send(self, fn, *args, wait: bool = False) -> None:
        self.pending.append((fn, args))
        self.flush(wait)

    def flush(self, wait: bool) -> None:
        # Known outage: one quick try per write. Otherwise ride out a short hiccup (a locked sqlite file).
        # `wait` (the trial's end): up to outage_timeout_s, since the process is about to exit.
        grace = self.outage_timeout_s if wait else (0.0 if self.outage_since else 5.0)
        deadline, delay = time.monotonic() + grace, 0.25
        refused = None  # the first write refused for good: the caller hears of it once the rest went out
        while self.pending:
            fn, args = self.pending[0]
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001
                if not _transient(exc):
                    self._drop(exc)
                    refused = refused or exc
                    continue
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    print(f"tracking unreachable, buffering writes: {redact(str(exc))[:200]}", flush=True)
                if time.monotonic() >= deadline:
                    if wait:  # given up on: the next waiting flush (the outcome's) waits for its own write
                        self._drop(exc)
                        raise
                    break
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 10.0)
                continue
            self.pending.pop(0)
            if self.outage_since is not None:
                print(f"tracking reachable again after {time.monotonic() - self.outage_since:.0f} s; "
                      f"delivering {len(self.pending) + 1} buffered writes", flush=True)
                self.outage_since = None
        if refused is not None:
            raise refused

    def _drop(self, exc: Exception) -> None:
        fn, _ = self.pending.pop(0)
        self.undelivered.append(f"{getattr(fn, '__name__', 'write')}: {type(exc).__name__}: {redact(str(exc))[:500]}")
        print(f"tracking: write undelivered, dropped: {self.undelivered[-1][:300]}", file=sys.stderr, flush=True)


_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch


class RunRecorder:
    """A trial's child run, created at once (waiting out an outage, up to outage_timeout_s: nothing after it can
    be recorded without the run id), then written through an outbox so a tracking server that is down for a
    while costs no metric. It lives in the trial's writer process (trainers/trial_run.py), not in the trial."""

    def __init__(self, cfg: TrackingConfig, run_name: str, params: dict, tags: dict, resume_run_id: str | None = None):
        if cfg.uri.startswith(("http://", "https://")):
            # MLflow's own HTTP retries (7, exponential backoff) would hold every write for minutes during an
            # outage; the outbox retries instead, in order.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client = client(cfg)
        self.outbox = _Outbox(cfg.outage_timeout_s)
        all_tags = {record.STATUS: "running", record.ROLE: "trial", record.GIT_COMMIT: git_commit(),
                    **{record.VERSION_TAG_PREFIX + k: v for k, v in library_versions().items()}, **tags}
        if cfg.parent_run_id:
            all_tags[record.PARENT_RUN_ID] = cfg.parent_run_id
        if cfg.sweep_id:
            all_tags[record.SWEEP_ID] = cfg.sweep_id
        created = []
        if resume_run_id:  # a trial restarted from its checkpoint: the same run, running again
            def reopen():
                self.client.update_run(resume_run_id, status="RUNNING")
                for stale in (record.ERROR, record.PRUNED_AT_STEP):  # what closing the interrupted attempt wrote
                    if stale in self.client.get_run(resume_run_id).data.tags:
                        self.client.delete_tag(resume_run_id, stale)
                self.client.set_tag(resume_run_id, record.STATUS, "running")
                created.append(self.client.get_run(resume_run_id))
            _Outbox(cfg.outage_timeout_s).send(reopen, wait=True)
        else:
            _Outbox(cfg.outage_timeout_s).send(
                lambda: created.append(self.client.create_run(experiment_id(cfg), run_name=run_name,
                                                              tags={k: redact(v) for k, v in all_tags.items()})),
                wait=True)
        self.run_id = created[0].info.run_id
        self.artifact_uri = created[0].info.artifact_uri
        # a resumed run keeps the params its first attempt logged (MLflow refuses a changed value, and a
        # restart on another node may count its threads differently)
        self.logged_params = dict(created[0].data.params) if resume_run_id else {}
        self.log_params(params)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        self.outbox.send(self._log_batch,
                         {"params": [Param(k, redact(v)[:6000]) for k, v in params.items()
                                     if v is not None and k not in self.logged_params]})

    def log_metrics(self, metrics: dict, step: int = 0, timestamp_ms: int | None = None) -> None:
        """`timestamp_ms`: when the trial measured them (a write delivered late keeps its time)."""
        self.log_metric_rows([(metrics, step, timestamp_ms)])

    def log_metric_rows(self, rows: list[tuple[dict, int, int | None]]) -> None:
        """Several logging calls' (metrics, step, timestamp_ms) as one write: one sqlite transaction or one
        request for all of them, in MLflow's batches of at most 1,000 metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), timestamp_ms or now, step)
                   for values, step, timestamp_ms in rows for k, v in values.items() if v is not None]
        for start in range(0, len(metrics), _METRICS_PER_BATCH):
            self.outbox.send(self._log_batch, {"metrics": metrics[start: start + _METRICS_PER_BATCH]})

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.outbox.send(self._log_batch, {"tags": [RunTag(k, redact(v)) for k, v in tags.items()]})

    def _log_batch(self, batch: dict) -> None:
        self.client.log_batch(self.run_id, **batch)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        # The folder is temporary: deliver now, waiting out an outage if there is one.
        self.outbox.send(self.client.log_artifacts, self.run_id, local_dir, artifact_path, wait=True)

    def log_table(self, frame, artifact_file: str) -> None:
        """A table the MLflow UI shows (and compares across runs) in its artifact and evaluation views."""
        self.outbox.send(self.client.log_table, self.run_id, frame, artifact_file, wait=True)

    def finish(self, status: str, error: str | None = None) -> None:
        """Record the outcome; blocks until every buffered write is delivered, so the trial's record is
        complete or the trial fails loudly."""
        def write_outcome() -> None:
            # runs after every earlier write was delivered or dropped: a run missing one is not recorded ok
            outcome, reason = status, error
            if outcome == "ok" and self.outbox.undelivered:
                outcome, reason = "failed", (f"{len(self.outbox.undelivered)} tracking writes undelivered; "
                                             f"first: {self.outbox.undelivered[0]}")
            write_status(self.client, self.run_id, outcome, reason)

        self.outbox.send(write_outcome, wait=True)


def outcome_of(exc: BaseException | None) -> tuple[str, str | None]:
    """A trial's status from how its body ended: normally → ok, StopTrial → pruned (a scheduler's stop is an
    outcome, not an error), out of memory → oom, anything else → failed; with the error text to record."""
    if exc is None:
        return "ok", None
    if isinstance(exc, StopTrial):
        return "pruned", None
    oom = type(exc).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError, without importing torch
    detail = f"{type(exc).__name__}: {exc}" if oom else \
        "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return ("oom" if oom else "failed"), redact(detail)


class StopTrial(Exception):
    """Raised by a trial's report callback when the scheduler stops the trial early; its run records `pruned`."""

    def __init__(self, step: int):
        super().__init__(f"stopped by the scheduler at step {step}")
        self.step = step


# MLflow's own run status for each of ours: ok and pruned trials ran as intended, the rest did not.
_MLFLOW_STATUS = {"ok": "FINISHED", "pruned": "FINISHED", "oom": "FAILED", "failed": "FAILED"}


def write_status(c, run_id: str, status: str, error: str | None = None, mlflow_status: str | None = None) -> None:
    """The only writer of a run's outcome: the `peftsweep.status` tag, the reason, and MLflow's run status
    (`running` leaves the run open; KILLED marks a run ended from outside: a dead process or a stopped sweep)."""
    from mlflow.entities import RunTag

    if status not in record.STATUSES:
        raise ValueError(f"unknown run status {status!r}")
    tags = [RunTag(record.STATUS, status)] + ([RunTag(record.ERROR, redact(error)[:5000])] if error else [])
    c.log_batch(run_id, tags=tags)
    if status != "running":
        c.set_terminated(run_id, mlflow_status or _MLFLOW_STATUS[status])


def open_sweep_run(cfg: TrackingConfig, sweep_id: str, params: dict, config_yaml: str) -> tuple[str, str]:
    """The sweep's parent run (status running), with its params and the sweep config it can resume from."""
    c = client(cfg)
    exp_id = experiment_id(cfg)
    run = c.create_run(exp_id, run_name=sweep_id, tags={record.ROLE: "sweep", record.SWEEP_ID: sweep_id,
                                                        record.STATUS: "running", record.GIT_COMMIT: git_commit()})
    for k, v in params.items():
        c.log_param(run.info.run_id, k, redact(v)[:6000])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SWEEP_CONFIG_FILE
        path.write_text(redact(config_yaml))
        c.log_artifact(run.info.run_id, str(path))
    return exp_id, run.info.run_id


SWEEP_CONFIG_FILE = "sweep_config.yaml"


def saved_sweep_config(c, parent) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return Path(c.download_artifacts(parent.info.run_id, SWEEP_CONFIG_FILE, tmp)).read_text()


def find_parent(c, experiment: str, sweep_id: str | None = None):
    """The parent run of `sweep_id`, or of the newest sweep in `experiment`."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} in this tracking store")
    flt = f"tags.`{record.ROLE}` = 'sweep'"
    if sweep_id:
        flt += f" and tags.`{record.SWEEP_ID}` = '{sweep_id}'"
    runs = c.search_runs([exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                         max_results=1)
    if not runs:
        raise LookupError(f"no sweep {sweep_id!r} in experiment {experiment!r}" if sweep_id
                          else f"no sweep in experiment {experiment!r}: run `peftsweep sweep` first")
    return runs[0]


def child_runs(c, experiment_id_: str, parent_run_id: str, extra_filter: str = "", max_results: int = 5000):
    """The trial runs of one sweep (optionally narrowed by an MLflow filter expression)."""
    flt = f"tags.`{record.PARENT_RUN_ID}` = '{parent_run_id}'" + (f" and {extra_filter}" if extra_filter else "")
    return c.search_runs([experiment_id_], filter_string=flt, max_results=max_results)


def finished_twin(cfg: TrackingConfig, trial_key: str):
    """A run of this sweep with the same trial key that already finished ok, or None (--resume)."""
    runs = child_runs(client(cfg), experiment_id(cfg), cfg.parent_run_id,
                      f"tags.`{record.TRIAL_KEY}` = '{trial_key}' and tags.`{record.STATUS}` = 'ok'", 1)
    return runs[0] if runs else None


def close_orphans(c, experiment_id_: str, parent_run_id: str, reason: str) -> int:
    """Child runs still RUNNING belong to trials whose process died (killed, OOM-killed, pruned by Ray
    while training, or a stopped sweep): say so instead of leaving them RUNNING forever."""
    orphans = child_runs(c, experiment_id_, parent_run_id, "attributes.status = 'RUNNING'")
    for run in orphans:
        write_status(c, run.info.run_id, "failed", reason, mlflow_status="KILLED")
    return len(orphans)


def mark_pruned(c, run_id: str, step) -> bool:
    """A trial the scheduler ended between reports, before it could record `pruned` itself."""
    if c.get_run(run_id).info.status != "RUNNING":
        return False
    c.set_tag(run_id, record.PRUNED_AT_STEP, str(step))
    write_status(c, run_id, "pruned")
    return True


def load_table(client, experiment_id: str, run_ids: list[str], artifact_file: str = record.GENERATIONS_TABLE):
    """The rows of `artifact_file` logged by `run_ids` (a `run_id` column tells them apart); empty when none
    of them logged it."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        return client.load_table(experiment_id, artifact_file, run_ids=list(run_ids), extra_columns=["run_id"])
    except MlflowException:
        return pd.DataFrame(columns=["id", "prompt", "reference", "generation", "run_id"])


def load_row_scores(client, run_id: str, split: str):
    """One run's per-row scores of `split` (`val` or `test`) as a frame, in split order: `row_id`, `score` and
    the task type's other columns (trainers/record.py ROW_SCORE). LookupError when the run logged none (a run
    from before row scores, or one that did not finish); pair runs only where their `row_ids_hash_<split>`
    params agree."""
    import json

    import pandas as pd
    from mlflow.exceptions import MlflowException

    if split not in record.ROW_SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(record.ROW_SPLITS)}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, record.row_scores_file(split), tmp)
        except (MlflowException, OSError) as exc:
            raise LookupError(f"run {run_id} has no {record.row_scores_file(split)}: {str(exc)[:200]}") from None
        table = json.loads(Path(path).read_text())
    frame = pd.DataFrame(table["data"], columns=table["columns"])
    frame[record.ROW_SCORE] = frame[record.ROW_SCORE].astype(float)  # all null (sft loss) reads as objects
    return frame
