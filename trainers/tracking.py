"""MLflow writes for one trial: a child run under the sweep's parent run, never left RUNNING.

Uses MlflowClient with explicit run ids (no global active run), so it is safe in Ray workers and in
processes that run several trials.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import time
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


def experiment_id(cfg: TrackingConfig) -> str:
    """Get or create the experiment; its artifact root is fixed at creation (local path → file URI)."""
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = cfg.artifact_location
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    try:
        return c.create_experiment(cfg.experiment, artifact_location=location)
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


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "mlflow", "ray"):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            pass
    return out


def _retry(fn, *args, attempts: int = 5, **kwargs):
    """sqlite under concurrent trials can answer 'database is locked'; a short backoff clears it."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            if i == attempts - 1:
                raise
            time.sleep(0.5 * 2 ** i)


class TrialRun:
    """A child run; a no-op when tracking is disabled (the bare baseline)."""

    def __init__(self, cfg: TrackingConfig, run_name: str, params: dict, tags: dict):
        self.enabled = cfg.enabled
        self.run_id = None
        if not self.enabled:
            return
        self.client = client(cfg)
        all_tags = {record.STATUS: "running", record.ROLE: "trial", record.GIT_COMMIT: git_commit(),
                    **{record.VERSION_TAG_PREFIX + k: v for k, v in library_versions().items()}, **tags}
        if cfg.parent_run_id:
            all_tags[record.PARENT_RUN_ID] = cfg.parent_run_id
        if cfg.sweep_id:
            all_tags[record.SWEEP_ID] = cfg.sweep_id
        run = _retry(self.client.create_run, experiment_id(cfg), run_name=run_name,
                     tags={k: redact(v) for k, v in all_tags.items()})
        self.run_id = run.info.run_id
        self.artifact_uri = run.info.artifact_uri
        self.log_params(params)

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        _retry(self.client.log_batch, self.run_id,
               params=[Param(k, redact(v)[:6000]) for k, v in params.items() if v is not None])

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        _retry(self.client.log_batch, self.run_id,
               metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None])

    def set_tags(self, tags: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        _retry(self.client.log_batch, self.run_id, tags=[RunTag(k, redact(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.enabled:
            _retry(self.client.log_artifacts, self.run_id, local_dir, artifact_path)

    def finish(self, status: str, error: str | None = None) -> None:
        """Record the outcome; MLflow's own status follows (ok/pruned → FINISHED, else FAILED)."""
        if not self.enabled:
            return
        tags = {record.STATUS: status}
        if error:
            tags[record.ERROR] = error[:5000]
        self.set_tags(tags)
        _retry(self.client.set_terminated, self.run_id, "FINISHED" if status in ("ok", "pruned") else "FAILED")
