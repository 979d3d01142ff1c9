"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, distinct custom
resources): a sweep attached with cluster.address runs trials on both nodes, each fully recorded."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, tiny_overrides
from trainers import record

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(temp_dir: str) -> None:
    """Stop only this cluster's processes: `ray stop` would kill every Ray on the machine (other sweeps too)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture
def two_nodes():
    # Ray 2.60 enables token auth when ~/.ray/auth_token exists; every process must then agree on it.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    ray = str(BIN / "ray")
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--resources={\"node_head\": 1}",
                        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                        "--resources={\"node_worker\": 1}", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                       check=True, env=env, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_trials_land_on_both_nodes(two_nodes, tiny_bert, store):
    address, env = two_nodes
    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", "search=tiny", f"cluster.address={address}",
                           "train.max_steps=3", *tiny_overrides(tiny_bert, store)],
                          capture_output=True, text=True, cwd=store["dir"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Ask the cluster for its nodes from a fresh process (Ray caches its auth mode per process).
    probe = subprocess.run([sys.executable, "-c", (
        "import json, ray; ray.init(address=%r, logging_level='error'); "
        "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))") % address],
        capture_output=True, text=True, env=env, timeout=120)
    nodes = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(nodes) == 2

    c = MlflowClient(store["uri"])
    runs = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    trials = [r for r in runs if r.data.tags.get(record.ROLE) == "trial"]
    assert len(trials) == 3 and all(r.data.tags[record.STATUS] == "ok" for r in trials)
    used = {r.data.tags[record.RAY_NODE] for r in trials}
    assert used == set(nodes), "every trial ran on a node of this cluster, and both nodes ran trials"
    assert {next(k for k in nodes[n] if k.startswith("node_")) for n in used} == {"node_head", "node_worker"}
    for r in trials:
        assert {"test_accuracy", record.PEAK_HOST_RSS_GB, record.TRAINABLE_PARAMS} <= set(r.data.metrics)
