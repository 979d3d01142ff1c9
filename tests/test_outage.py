"""The MLflow server goes away for 20 s in the middle of a sweep: the trial keeps training, buffers what it
cannot deliver, and when the server is back its record is complete — every validation step, every final
metric, the adapter — and nothing is left RUNNING."""
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, SMALL_DATA
from trainers import record

pytestmark = pytest.mark.slow

OUTAGE_S = 20
EVAL_EVERY = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(db: str, artifacts: str, port: int, log) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", db, "--artifacts-destination", artifacts],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise AssertionError("mlflow server did not come up")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _first_child_with_metrics(c: MlflowClient):
    exp = c.get_experiment_by_name("peftsweep")
    if exp is None:
        return None
    for run in c.search_runs([exp.experiment_id]):
        if run.data.tags.get(record.ROLE) == "trial" and "val_loss" in run.data.metrics:
            return run
    return None


def test_a_tracking_outage_mid_sweep_loses_nothing(tiny_bert, tmp_path):
    port, uri = _free_port(), None
    uri = f"http://127.0.0.1:{port}"
    db, artifacts = f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts")
    log = open(tmp_path / "server.log", "ab")
    server = _start_server(db, artifacts, port, log)
    # the outage starts at the first validation pass (step 100) and the trial trains on through it: ~1,900
    # steps are ~30 s of the tiny model on one thread on a fast machine, longer than OUTAGE_S (a trial that
    # ended inside the outage would still pass: its end waits for the server, up to outage_timeout_s)
    max_steps = 2000
    sweep = subprocess.Popen(
        [str(BIN / "peftsweep"), "sweep", "tracking=server", f"tracking.uri={uri}", "search=tiny",
         "search.space.method.r=[8]", "search.full_ft_arm=false", f"model.path={tiny_bert}", "model.name=tiny-bert",
         *SMALL_DATA, "train.epochs=100000", f"train.max_steps={max_steps}", f"train.eval_every_steps={EVAL_EVERY}",
         "tracking.outage_timeout_s=300"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        c = MlflowClient(uri)
        deadline = time.time() + 300
        while (run := _first_child_with_metrics(c)) is None:
            assert sweep.poll() is None, sweep.stdout.read()[-3000:]
            assert time.time() < deadline, "the trial never logged a validation step"
            time.sleep(0.5)
        outage_start = time.time()
        _stop(server)
        time.sleep(OUTAGE_S)
        outage_end = time.time()
        server = _start_server(db, artifacts, port, log)
        out, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, out[-3000:]
        _check_record(c, run.info.run_id, out, outage_start, outage_end, max_steps)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        _stop(server)


def _check_record(c, run_id, out, outage_start, outage_end, max_steps):
    # the outage really hit a running trial, which said so and went on
    assert "tracking unreachable, buffering writes" in out, out[-3000:]
    assert "tracking reachable again" in out, out[-3000:]

    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[record.STATUS] == "ok"
    # every validation pass is there, in order, none lost or doubled
    history = c.get_metric_history(run.info.run_id, "val_loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(EVAL_EVERY, max_steps, EVAL_EVERY)) + [max_steps], steps
    # some of them were taken while the server was down and delivered later with their own timestamps
    during = [m for m in history if outage_start * 1000 <= m.timestamp <= outage_end * 1000]
    assert during, "no validation step fell inside the outage"
    for key in ("test_accuracy", record.PEAK_HOST_RSS_GB, record.TRAIN_TIME_S, record.TRAINABLE_PARAMS):
        assert key in run.data.metrics, key
    assert any(f.path == record.ADAPTER_DIR for f in c.list_artifacts(run.info.run_id))
    # the sweep's own record is closed too
    parents = [r for r in c.search_runs([run.info.experiment_id]) if r.data.tags.get(record.ROLE) == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
