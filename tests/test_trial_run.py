"""A trial's run is written by a process of its own (trainers/trial_run.py): what the trial sent survives the
trial's death, a Ctrl-C is recorded rather than killing the writer, and a writer that dies fails the trial
loudly instead of losing its record quietly."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL_DATA
from tests.test_trial import _cfg
from trainers import record
from trainers.trial import run_trial
from trainers.trial_run import TrackingError


def _writers_since(start: float) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        if "trainers.trial_run" in " ".join(proc.info["cmdline"] or []) and proc.info["create_time"] >= start - 1:
            out.append(proc)
    return out


def _trial(tiny_bert, store, *overrides) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainers", "--json", f"model.path={tiny_bert}",
                             "model.name=tiny-bert", f"tracking.uri={store['uri']}",
                             f"tracking.artifact_location={store['artifacts']}", *SMALL_DATA, *overrides],
                            cwd=store["dir"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_as_from_a_terminal)


def _as_from_a_terminal() -> None:
    """A command typed at a terminal gets SIGINT's default action; one spawned under a shell's `&` (a suite
    run in the background) inherits SIGINT ignored, and Python then installs no Ctrl-C handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _only_run(store):
    c = MlflowClient(store["uri"])
    (run,) = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    return c, run


def test_a_killed_trial_keeps_every_write_it_made_and_its_writer_exits(tiny_bert, store):
    start = time.time()
    proc = _trial(tiny_bert, store, "train.eval_every_steps=1", "train.max_steps=6", "train.inject_fault=kill@4")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    deadline = time.time() + 60
    while _writers_since(start):
        assert time.time() < deadline, "the writer outlived its trial by a minute"
        time.sleep(0.2)
    c, run = _only_run(store)
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_loss"))
    assert steps[:3] == [1, 2, 3], steps  # every validation pass sent before the kill was delivered
    # the outcome is left to whoever owns the trial (a sweep marks it killed): the writer cannot know it
    assert run.info.status == "RUNNING" and run.data.tags[record.STATUS] == "running"


def test_ctrl_c_on_a_trial_is_recorded_as_its_failure(tiny_bert, store):
    # a validation pass every 50 steps: the writer keeps up (one sqlite transaction per write; every 5 steps of
    # the tiny model outruns it, and the trial's end then waits for the backlog)
    proc = _trial(tiny_bert, store, "train.eval_every_steps=50", "train.epochs=100000", "train.max_steps=100000")
    db = store["dir"] / "mlflow.db"
    deadline = time.time() + 240
    while True:  # training, with a validation pass recorded
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        assert time.time() < deadline, "no validation pass was recorded"
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                if conn.execute("select count(*) from metrics where key = 'val_loss'").fetchone()[0]:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-2000:]
    _, run = _only_run(store)
    assert run.info.status == "FAILED" and run.data.tags[record.STATUS] == "failed", out[-2000:]
    assert "KeyboardInterrupt" in run.data.tags[record.ERROR]


def test_a_writer_that_dies_fails_the_trial_loudly(tiny_bert, store):
    cfg = _cfg(tiny_bert, store)
    cfg.train.eval_every_steps = 1

    def kill_writer(step: int) -> None:
        if step == 2:
            (writer,) = [p for p in psutil.Process().children()
                         if "trainers.trial_run" in " ".join(p.cmdline())]
            writer.kill()
            writer.wait(10)

    with pytest.raises(TrackingError, match="tracking writer process ended"):
        run_trial(cfg, fault_hook=kill_writer)


def test_metrics_writes_waiting_behind_each_other_become_one_store_write_in_order():
    import queue

    from trainers.trial_run import _NOTHING, _take_metrics

    def metrics(step):
        return {"op": "metrics", "id": step, "reply": False, "metrics": {"val_loss": step / 10}, "step": step,
                "timestamp_ms": 1000 + step}

    inbox: queue.Queue = queue.Queue()
    tags = {"op": "tags", "id": 90, "reply": False, "tags": {"k": "v"}}
    for msg in (metrics(2), metrics(3), tags, metrics(4), None):
        inbox.put(msg)
    merged, carried = _take_metrics(inbox, metrics(1))
    assert merged["op"] == "metrics" and merged["rows"] == [({"val_loss": s / 10}, s, 1000 + s) for s in (1, 2, 3)]
    assert carried is tags  # the first other request ends the run and is served next: nothing overtakes it
    merged, carried = _take_metrics(inbox, inbox.get())
    assert merged["rows"] == [({"val_loss": 0.4}, 4, 1004)] and carried is None  # the end of input is kept too
    merged, carried = _take_metrics(inbox, metrics(5))
    assert carried is _NOTHING


def test_a_burst_of_metrics_writes_is_delivered_whole_with_each_ones_step_and_time(store):
    from trainers.config import TrackingConfig
    from trainers.trial_run import TrialRun

    cfg = TrackingConfig(uri=store["uri"], artifact_location=store["artifacts"])
    run = TrialRun(cfg, run_name="burst", params={"p": 1}, tags={record.ARM: "burst"})
    run.ready()
    sent = {}
    for step in range(1, 1501):  # 1,500 writes of 2 metrics: more than one MLflow batch when merged
        run.log_metrics({"val_loss": 1 / step, "train_loss": float(step)}, step=step)
        sent[step] = int(time.time() * 1000)
    run.finish("ok")
    c = MlflowClient(store["uri"])
    history = c.get_metric_history(run.run_id, "val_loss")
    assert sorted(m.step for m in history) == list(range(1, 1501))
    assert all(m.value == 1 / m.step and abs(m.timestamp - sent[m.step]) < 1000 for m in history)
    assert len(c.get_metric_history(run.run_id, "train_loss")) == 1500
    assert c.get_run(run.run_id).data.tags[record.STATUS] == "ok"
