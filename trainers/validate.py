"""Checks a trial can run, without loading weights or data into a model: used by `python -m trainers`,
`peftsweep plan` and `peftsweep sweep` before anything starts."""
from __future__ import annotations

from trainers import data, quantization, sft, sources
from trainers.config import ConfigError, TrialConfig
from trainers.device import pick_device
from trainers.estimate import sequence_length
from trainers.model import cached_meta_model, position_limit
from trainers.modules import min_dim, resolve_target_modules

_SOURCES: dict = {}


def _source_facts(task) -> tuple[tuple[str, ...], dict]:
    """(columns, rows per label value) of a data source, read once per process however many trials share it."""
    key = (task.source.path, task.source.format, task.label_column)
    if key not in _SOURCES:
        frame = data.read_source(task)
        counts = (frame[task.label_column].astype(str).value_counts().to_dict()
                  if task.label_column in frame else {})
        _SOURCES[key] = (tuple(map(str, frame.columns)), counts)
    return _SOURCES[key]


def _sft_problems(cfg: TrialConfig) -> list[str]:
    """Every row must read as a conversation ending in a non-empty answer, and the tokenizer must render it:
    found now, not after a sweep's first trial has trained for minutes."""
    task = cfg.task
    key = ("sft", task.source.path, task.source.format, task.format, repr(sorted(task.columns.items())),
           task.instruction, task.split_seed, task.test_size, task.validation_size)
    if key not in _SOURCES:
        try:
            frames = sources.read(task.source, task.name)
            for frame in frames.values():
                sft.normalize(frame, task)
            sources.partition(frames, task)
            _SOURCES[key] = None
        except ConfigError as exc:
            _SOURCES[key] = str(exc)
    problems = [_SOURCES[key]] if _SOURCES[key] else []
    tkey = ("tokenizer", cfg.model.path, cfg.model.gguf_file, cfg.model.revision, task.format, task.chat_template)
    if tkey not in _SOURCES:
        from trainers.model import load_tokenizer

        try:
            _SOURCES[tkey] = sft.template_problem(load_tokenizer(cfg), task)
        except ConfigError as exc:
            _SOURCES[tkey] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a model without a loadable tokenizer
            _SOURCES[tkey] = f"cannot load the tokenizer of {cfg.model.path!r}: {str(exc).splitlines()[0][:200]}"
    return problems + ([_SOURCES[tkey]] if _SOURCES[tkey] else [])


def validate_trial(cfg: TrialConfig) -> list[str]:
    """Every problem found, each one line; empty when the trial can start."""
    problems: list[str] = []
    store = tracking_problem(cfg.tracking)
    if store:
        problems.append(store)
    device = pick_device(cfg.train.device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append("train.device=cuda but no CUDA device is visible")
    err = quantization.support_error(cfg.quant, device)
    if err:
        problems.append(err)
    if cfg.train.packing and (cfg.train.workers == "auto" or cfg.train.workers > 1):
        # a packed step holds whole examples of unequal lengths (trainers/batching.py): its rows do not split into
        # per-worker slices of the same work, so packing stays a one-worker feature for now
        problems.append("train.packing with train.workers > 1 is not supported yet: set train.packing=false "
                        "or train.workers=1")
    if cfg.task.type == "sft":
        problems += _sft_problems(cfg)
    else:
        problems += _classification_data_problems(cfg)
    try:
        model = cached_meta_model(cfg)
    except ConfigError as exc:
        return problems + [str(exc)]
    limit = position_limit(model.config)
    if limit and sequence_length(cfg) > limit:
        # past the position table the model fails mid-trial (absolute positions) or degrades silently (rotary)
        extra = {"classification": "", "causal_lm_sft": " (with the answer tokens a causal LM adds)",
                 "sft": f" (with task.max_new_tokens={cfg.task.max_new_tokens} generated after the prompt)"}
        problems.append(f"task.max_length={cfg.task.max_length} exceeds the {limit} positions of {cfg.model.name}"
                        + extra[cfg.task.type])
    if cfg.method.is_adapter:
        try:
            targets = resolve_target_modules(model, cfg.method.target_modules)
        except ConfigError as exc:
            return problems + [str(exc)]
        modules = dict(model.named_modules())
        if cfg.method.name != "ia3":
            smallest = min(min_dim(modules[n]) for n in targets)
            if cfg.method.r > smallest:
                problems.append(f"method.r={cfg.method.r} exceeds the smallest targeted layer dimension "
                                f"({smallest}) of {cfg.model.name}")
    return problems


def _classification_data_problems(cfg: TrialConfig) -> list[str]:
    problems = []
    try:
        task = cfg.task
        columns, labels = _source_facts(task)
        data.check_columns(task, columns)
        missing = [lab for lab in task.labels if lab not in labels]
        if missing:
            problems.append(f"task {task.name}: label(s) {missing} never occur in column {task.label_column!r}")
        rows = sum(labels.get(lab, 0) for lab in task.labels)
        if not missing and task.test_size + task.validation_size >= rows:
            problems.append(f"task {task.name}: test_size + validation_size = "
                            f"{task.test_size + task.validation_size} leaves no training rows out of {rows}")
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


# --- the tracking store, checked before anything starts ---------------------------------------------------
# A store that cannot be reached or opened at the start is bad input, refused in a few seconds with one line.
# Riding out an outage (trainers/tracking.py's outbox, waiting up to tracking.outage_timeout_s) is for a store
# that was there when the sweep started and went away. The check imports no MLflow (`python -m trainers`
# never loads it in the trial's process): sqlite is a file, a database a SQLAlchemy connection, a server one
# request without retries.
TRACKING_CHECK_S = 10.0  # the most a check may take, whatever the network does
_STORES: dict = {}  # uri -> (checked at, problem): a plan checks once, not once per trial
_STORE_CHECK_TTL_S = 30.0
_DATABASES = ("postgresql", "mysql", "mariadb", "mssql", "oracle")


def tracking_problem(cfg) -> str | None:
    """One line saying why `cfg` (a TrackingConfig)'s store cannot be reached or opened now, or None. Bounded
    by TRACKING_CHECK_S; a password in the URI is never part of the line."""
    import threading
    import time

    from trainers.tracking import absolute_uri, redact

    if not cfg.enabled:
        return None
    uri = absolute_uri(cfg.uri)
    cached = _STORES.get(uri)
    if cached and time.monotonic() - cached[0] < _STORE_CHECK_TTL_S:
        return cached[1]
    outcome: list = []

    def check() -> None:
        try:
            outcome.append(_store_problem(uri, cfg.experiment))
        except Exception as exc:  # noqa: BLE001 - whatever opening the store raises is why it cannot be opened
            outcome.append(f"cannot open the store: {_first_line(exc)}")

    worker = threading.Thread(target=check, daemon=True)  # a connect that hangs must not hold the command
    worker.start()
    worker.join(TRACKING_CHECK_S)
    problem = outcome[0] if outcome else f"no answer within {TRACKING_CHECK_S:.0f} s"
    problem = redact(f"tracking.uri {uri}: {problem}") if problem else None
    _STORES[uri] = (time.monotonic(), problem)
    return problem


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _store_problem(uri: str, experiment: str) -> str | None:
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme == "sqlite":
        return _sqlite_problem(uri)
    if scheme in ("http", "https"):
        return _server_problem(uri, experiment)
    if scheme in _DATABASES:
        return _database_problem(uri, scheme)
    return None  # a local folder (MLflow creates it), or a scheme a plugin serves: MLflow says at first use


def _sqlite_problem(uri: str) -> str | None:
    import os

    path = uri.split("://", 1)[1].split("?", 1)[0]
    path = path[1:] if path.startswith("/") else path  # sqlite:///x: the third slash ends the (empty) host
    if path in ("", ":memory:"):
        return None
    if os.path.isdir(path):
        return f"cannot open the store: {path} is a folder, not a database file"
    if os.path.exists(path):
        if not os.access(path, os.R_OK | os.W_OK):
            return f"cannot open the store: {path} is not readable and writable by this user"
        with open(path, "rb") as fh:
            header = fh.read(16)
        if header and header != b"SQLite format 3\x00":
            return f"cannot open the store: {path} is not an SQLite database"
        return None
    # MLflow creates the file and any missing folders on first use: the nearest existing one must take them
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"cannot open the store: {folder} is a file, not a folder the database can be created in"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot open the store: folder {folder} is not writable by this user"
    return None


def _database_problem(uri: str, scheme: str) -> str | None:
    try:
        import sqlalchemy
    except ImportError:
        return "cannot open the store: SQLAlchemy is not installed"
    # a refused port answers at once; one that drops packets would wait for the driver's own default
    connect_args = {"timeout": 5} if scheme == "mssql" else {"connect_timeout": 5}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
    except ImportError as exc:  # the URI's driver (SQLAlchemy's default for a bare scheme) is not installed
        return (f"cannot open the store: {_first_line(exc)} (install that driver, or name an installed one "
                f"as {scheme}+<driver>://)")
    except Exception as exc:  # noqa: BLE001 - an unknown dialect or driver name, a malformed URI
        return f"cannot open the store: {_first_line(exc)}"
    try:
        with engine.connect():
            return None
    except Exception as exc:  # noqa: BLE001 - refused, unknown host, bad credentials, no such database
        return f"cannot reach the store: {_first_line(exc)}"
    finally:
        engine.dispose()


def _server_problem(uri: str, experiment: str) -> str | None:
    """One request, no retries, with the credentials and TLS settings MLflow's client would use from the
    environment. Any answer from an MLflow server will do (no experiment yet included), except credentials
    refused or a server error."""
    import base64
    import json
    import os
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    url = (uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?"
           + urllib.parse.urlencode({"experiment_name": experiment}))
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    context = None
    if uri.startswith("https://"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()  # noqa: S323 - what the user asked MLflow for
        else:
            context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
        if os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
            context.load_cert_chain(os.environ["MLFLOW_TRACKING_CLIENT_CERT_PATH"])
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5, context=context):
            return None
    except urllib.error.HTTPError as exc:
        body = exc.read(2000).decode(errors="replace")
        try:
            code = json.loads(body).get("error_code")
        except (ValueError, AttributeError):
            code = None
        if exc.code == 404 and code == "RESOURCE_DOES_NOT_EXIST":
            return None  # no such experiment yet: the sweep creates it
        if exc.code in (401, 403):
            if os.environ.get("MLFLOW_TRACKING_AUTH"):
                return None  # an auth plugin's credentials, which this check cannot send: MLflow's client will
            return (f"the server refused the credentials (HTTP {exc.code}): set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        if exc.code == 404:
            return "cannot open the store: the server does not answer as an MLflow tracking server (HTTP 404)"
        return f"the server answered HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        return f"cannot reach the server: {_first_line(reason) if isinstance(reason, BaseException) else reason}"
    except Exception as exc:  # noqa: BLE001 - a timeout (socket.timeout), a TLS failure, a reset connection
        return f"cannot reach the server: {_first_line(exc)}"
