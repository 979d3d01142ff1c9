"""A sweep stopped as Kubernetes, Slurm, systemd or CI stop a process (SIGTERM), or by Ctrl-C (SIGINT),
closes every MLflow run, exits 128 + signal, and resumes; while it runs, local Ray listens on loopback only.

Each case is repeated PEFTSWEEP_STOP_REPEATS times (default 1; `PEFTSWEEP_STOP_REPEATS=3` for the stress run)."""
import ipaddress
import os
import signal
import sqlite3
import subprocess
import time

import psutil
import pytest

from tests.conftest import BIN, tiny_overrides
from tests.test_e2e import _runs
from trainers import record

pytestmark = pytest.mark.slow
REPEATS = int(os.environ.get("PEFTSWEEP_STOP_REPEATS", "1"))


def _statuses(db) -> dict:
    """{trial run id: (MLflow status, peftsweep.status)}, read with plain sqlite so polling never races the
    driver's schema set-up."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("select r.run_uuid, r.status, t.value from runs r "
                                "join tags t on t.run_uuid = r.run_uuid and t.key = ? "
                                "join tags role on role.run_uuid = r.run_uuid and role.key = ? and role.value = 'trial'",
                                (record.STATUS, record.ROLE)).fetchall()
        return {run: (status, tag) for run, status, tag in rows}
    except sqlite3.Error:
        return {}


def _listening(pid: int) -> dict:
    """{process name: listening addresses} of the driver and every process it started (GCS, raylet, workers)."""
    out: dict = {}
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = os.path.basename(proc.cmdline()[0]) if proc.cmdline() else proc.name()
            addrs = {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
        out.setdefault(name, set()).update(addrs)
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("signame,exit_code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stopped_sweep_leaves_no_run_running_and_resumes(tiny_bert, store, signame, exit_code, repeat):
    # one trial at a time: the first finishes, the second is stopped mid-training
    args = [*tiny_overrides(tiny_bert, store), "search=tiny", "search.full_ft_arm=false",
            "cluster.max_concurrent_trials=1", "task.train_size=400", "train.epochs=40", "train.max_steps=500"]
    driver = subprocess.Popen([str(BIN / "peftsweep"), "sweep", *args], cwd=store["dir"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    db = store["dir"] / "mlflow.db"
    deadline, sockets = time.time() + 300, {}
    while time.time() < deadline and driver.poll() is None:
        states = _statuses(db).values()
        if any(tag == "ok" for _, tag in states) and any(s == "RUNNING" and tag == "running" for s, tag in states):
            sockets = _listening(driver.pid)
            break
        time.sleep(0.3)
    assert driver.poll() is None, "the sweep ended before it could be stopped: make its trials longer"

    # the sweep's own listeners: loopback only (an exposed Ray accepts anyone's jobs)
    assert {"raylet", "gcs_server"} <= set(sockets), sockets
    exposed = {name: sorted(a for a in addrs if not _is_loopback(a)) for name, addrs in sockets.items()}
    assert not any(exposed.values()), exposed

    if signame == "SIGTERM":
        os.kill(driver.pid, signal.SIGTERM)  # what `timeout`, kubelet and systemd send: the driver alone
    else:
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    out, err = driver.communicate(timeout=180)
    assert driver.returncode == exit_code, out[-2000:] + err[-2000:]
    assert "Aborted" not in err and "*** SIGTERM received" not in err
    assert f"sweep stopped by {signame}" in err

    _, parents, children = _runs(store)
    assert all(r.info.status != "RUNNING" for r in parents + children)
    (parent,) = parents
    assert parent.info.status == "KILLED" and parent.data.tags[record.STATUS] == "failed"
    assert f"stopped by {signame}" in parent.data.tags[record.ERROR]
    stopped = [r for r in children if r.data.tags[record.STATUS] != "ok"]
    assert stopped and all(f"stopped by {signame}" in r.data.tags[record.ERROR] for r in stopped)
    finished = {r.info.run_id for r in children if r.data.tags[record.STATUS] == "ok"}
    assert len(finished) == 1

    if repeat or signame == "SIGINT":
        return  # resuming is the same whatever stopped the sweep, and on every repeat
    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", "--resume", f"tracking.uri={store['uri']}"],
                          capture_output=True, text=True, cwd=store["dir"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, parents, children = _runs(store)
    assert parents[0].info.status == "FINISHED" and all(r.info.status != "RUNNING" for r in children)
    ok = [r for r in children if r.data.tags[record.STATUS] == "ok"]
    assert len(ok) == 2 and finished <= {r.info.run_id for r in ok}, "the finished trial must not run again"
    assert len({r.data.tags[record.ARM] for r in ok}) == 2
