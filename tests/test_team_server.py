"""The team MLflow server for real: a PostgreSQL cluster from Debian's server binaries (local_postgres.sh) and
`mlflow server` with basic auth (start_server.sh) on 127.0.0.1, a real sweep logging to it over HTTP with
credentials from the environment, and requests without valid credentials refused.

PostgreSQL is not optional here: without its server binaries (`make system-deps` installs them) the module
fails, it does not skip."""
from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import BIN, REPO, SMALL_DATA
from trainers import record

pytestmark = pytest.mark.slow

INFRA = REPO / "infra" / "mlflow"
ADMIN = "admin"  # admin_username in infra/mlflow/basic_auth.ini


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pgrep(*args: str) -> list[str]:
    out = subprocess.run(["pgrep", "-a", *args], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _http(srv: dict, method: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None):
    """(status, headers, body text) of one raw request: no MLflow client, no retries, no env credentials."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(srv["url"] + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode(errors="replace")


def _pg(uri: str):
    import psycopg2

    # SQLAlchemy's postgresql+psycopg2:// is not a libpq URI
    return psycopg2.connect(uri.replace("postgresql+psycopg2://", "postgresql://", 1), connect_timeout=10)


def _query(uri: str, sql: str, args=()):
    conn = _pg(uri)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def _tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def team_server():
    """PostgreSQL + `mlflow server --app-name basic-auth` on loopback, as infra/README.md (c) describes.
    Teardown stops both, checks that none of their processes is left, and removes the directory."""
    script_pg, script_server = INFRA / "local_postgres.sh", INFRA / "start_server.sh"
    # short: PostgreSQL's unix socket path (base/pg/run/.s.PGSQL.PORT) must stay under ~100 bytes
    base = Path(tempfile.mkdtemp(prefix="pst-", dir="/tmp"))
    base.chmod(0o755)  # the cluster runs as the `postgres` OS user when we are root: it must traverse base
    pg_dir, state_dir, log_path = base / "pg", base / "mlflow", base / "server.log"
    srv: dict = {"base": base, "pg_dir": pg_dir, "log": log_path, "artifacts": state_dir / "artifacts"}
    server = log = None
    started: list[tuple[psutil.Process, str]] = []
    try:
        pg_port = _free_port()
        start = subprocess.run(["bash", str(script_pg), "start", str(pg_dir), str(pg_port)], capture_output=True,
                               text=True, timeout=180)
        assert start.returncode == 0, ("local_postgres.sh start failed (PostgreSQL server binaries missing? "
                                       f"run `make system-deps`):\n{start.stderr[-3000:]}")
        backend_uri = start.stdout.strip().splitlines()[-1]
        assert backend_uri.startswith("postgresql+psycopg2://") and f"@127.0.0.1:{pg_port}/" in backend_uri
        envout = subprocess.run(["bash", str(script_pg), "env", str(pg_dir)], capture_output=True, text=True,
                                timeout=60, check=True).stdout
        pg_env = dict(shlex.split(line)[1].split("=", 1) for line in envout.splitlines() if line.startswith("export "))
        assert pg_env["PEFTSWEEP_PG_URI"] == backend_uri and pg_env["PEFTSWEEP_AUTH_DB_URI"] != backend_uri
        srv.update(backend_uri=backend_uri, auth_db_uri=pg_env["PEFTSWEEP_AUTH_DB_URI"],
                   pg_password=backend_uri.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1])

        port = _free_port()
        password = f"pw-{secrets.token_hex(12)}"  # not a default anywhere; distinctive for the leak search
        srv.update(port=port, url=f"http://127.0.0.1:{port}", user=ADMIN, password=password)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(pg_env, MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32), MLFLOW_AUTH_ADMIN_PASSWORD=password,
                   PEFTSWEEP_MLFLOW_PORT=str(port), PEFTSWEEP_MLFLOW_STATE_DIR=str(state_dir),
                   PEFTSWEEP_MLFLOW_BIN=str(BIN / "mlflow"), PATH=f"{BIN}:{os.environ.get('PATH', '')}",
                   # MLflow's GenAI job runner (7 huey processes) plays no part in sweeps; on 2 cores it
                   # only slows start-up and shutdown
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("PEFTSWEEP_MLFLOW_HOST", None)  # the default must be loopback
        log = open(log_path, "wb")
        server = subprocess.Popen(["bash", str(script_server)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True, cwd=base)
        srv["server"] = server
        deadline = time.time() + 300  # 2 busy cores: MLflow's imports alone can take most of a minute
        while True:
            assert server.poll() is None, f"start_server.sh exited with {server.returncode}:\n{_tail(log_path)}"
            try:
                with urllib.request.urlopen(srv["url"] + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"MLflow server not healthy within 300 s:\n{_tail(log_path)}"
            time.sleep(1)
        # every process of both servers, to check at the end that none outlives the fixture
        postmaster = psutil.Process(int((pg_dir / "data" / "postmaster.pid").read_text().split()[0]))
        started = [(p, " ".join(p.cmdline())[:150])
                   for p in (*_tree(server.pid), postmaster, *postmaster.children(recursive=True))]
        yield srv
    finally:
        errors = []
        if server is not None:
            pgid = server.pid  # start_new_session: the group of bash -> exec mlflow -> uvicorn
            if server.poll() is None:
                try:
                    os.killpg(pgid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                errors.append("mlflow server ignored SIGTERM for 60 s")
            deadline = time.time() + 30
            while _pgrep("-g", str(pgid)) and time.time() < deadline:
                time.sleep(0.5)
            if left := _pgrep("-g", str(pgid)):
                errors.append(f"mlflow server processes left after SIGTERM: {left}")
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                server.wait(timeout=30)
        if log is not None:
            log.close()
        if (pg_dir / "data" / "PG_VERSION").exists():
            stop = subprocess.run(["bash", str(script_pg), "stop", str(pg_dir)], capture_output=True, text=True,
                                  timeout=120)
            if stop.returncode != 0:
                errors.append(f"local_postgres.sh stop failed: {stop.stderr[-2000:]}")
        # nothing started here may survive: the processes seen while serving, and anything naming the
        # directory (postgres runs with -D <base>/pg/data)
        if left := [f"{p.pid} {cmd}" for p, cmd in started if _alive(p)]:
            errors.append(f"processes left behind: {left}")
        if left := _pgrep("-f", str(base)):
            errors.append(f"processes left behind: {left}")
        shutil.rmtree(base, ignore_errors=True)
        assert not errors, "\n".join(errors)


def _sweep_overrides(tiny_bert: str, srv: dict) -> list[str]:
    return ["tracking=server", f"tracking.uri={srv['url']}", f"model.path={tiny_bert}", "model.name=tiny-bert",
            *SMALL_DATA, "search=tiny", "train.max_steps=3"]


def test_sweep_logs_to_the_team_server(tiny_bert, store, team_server, monkeypatch):
    srv = team_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_TRACKING_USERNAME=srv["user"], MLFLOW_TRACKING_PASSWORD=srv["password"])
    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", *_sweep_overrides(tiny_bert, srv)], capture_output=True,
                          text=True, cwd=store["dir"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + "\nserver log:\n" + _tail(srv["log"])
    assert srv["password"] not in proc.stdout + proc.stderr
    # nor in what Ray Tune keeps in the sweep's working directory (trial params, results, experiment state)
    written = [p for p in Path(store["dir"]).rglob("*") if p.is_file()]
    assert any(p.name == "params.json" for p in written), "no Ray Tune trial state found"
    assert not [p for p in written if srv["password"].encode() in p.read_bytes()]

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", srv["user"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", srv["password"])
    c = MlflowClient(srv["url"])
    exp = c.get_experiment_by_name("peftsweep")
    assert exp is not None
    # artifacts go through the server (proxied), not from the client straight to a path both happen to see
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    parents = [r for r in runs if r.data.tags.get(record.ROLE) == "sweep"]
    children = [r for r in runs if r.data.tags.get(record.ROLE) == "trial"]
    assert len(runs) == 4 and len(parents) == 1 and len(children) == 3, [r.data.tags for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags[record.STATUS] == "ok"
    assert parent.data.params["n_trials"] == "3"
    assert {r.data.tags[record.PARENT_RUN_ID] for r in children} == {parent.info.run_id}
    assert {r.data.params["method"] for r in children} == {"full", "lora"}
    assert sorted(r.data.params.get("r") for r in children if r.data.params["method"] == "lora") == ["4", "8"]
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags[record.STATUS] == "ok", r.data.tags
        assert r.data.params["sweep_id"] == parent.data.tags[record.SWEEP_ID]
        assert 0 <= r.data.metrics["test_accuracy"] <= 1
        assert r.data.metrics[record.PEAK_HOST_RSS_GB] > 0
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri

    # adapters uploaded through the server, stored in its --artifacts-destination, and readable back
    lora = next(r for r in children if r.data.params["method"] == "lora")
    listed = {f.path: f for f in c.list_artifacts(lora.info.run_id, record.ADAPTER_DIR)}
    weights = f"{record.ADAPTER_DIR}/adapter_model.safetensors"
    assert weights in listed and listed[weights].file_size > 0, sorted(listed)
    assert f"{record.ADAPTER_DIR}/{record.TRIAL_CONFIG_FILE}" in listed
    on_server = list(srv["artifacts"].rglob(f"{lora.info.run_id}/artifacts/{weights}"))
    assert len(on_server) == 1 and on_server[0].stat().st_size == listed[weights].file_size
    local = c.download_artifacts(lora.info.run_id, f"{record.ADAPTER_DIR}/adapter_config.json", str(store["dir"]))
    assert json.loads(Path(local).read_text())["r"] == int(lora.data.params["r"])
    full = next(r for r in children if r.data.params["method"] == "full")
    assert "model/model.safetensors" in {f.path for f in c.list_artifacts(full.info.run_id, "model")}
    assert "sweep_config.yaml" in {f.path for f in c.list_artifacts(parent.info.run_id)}

    # no secret in any param or tag of any run, nor in any stored artifact (configs, READMEs, weights)
    secret_values = {"admin password": srv["password"], "PostgreSQL password": srv["pg_password"]}
    for r in runs:
        for kind, values in (("param", r.data.params), ("tag", r.data.tags)):
            for k, v in values.items():
                for what, secret in secret_values.items():
                    assert secret not in v, f"{what} in {kind} {k} of run {r.info.run_name}"
    stored = [p for p in srv["artifacts"].rglob("*") if p.is_file()]
    assert len(stored) >= 3 * 3 + 1  # 3 trials x (weights, config, trial yaml) + the sweep config
    for p in stored:
        blob = p.read_bytes()
        for what, secret in secret_values.items():
            assert secret.encode() not in blob, f"{what} in artifact {p}"

    # and the runs really are in PostgreSQL, the database the server was pointed at
    in_pg = _query(srv["backend_uri"], "select r.run_uuid, r.status from runs r join experiments e "
                                       "on e.experiment_id = r.experiment_id where e.name = %s", ("peftsweep",))
    assert len(in_pg) == 4
    assert {u for u, _ in in_pg} == {r.info.run_id for r in runs}
    assert {s for _, s in in_pg} == {"FINISHED"}
    n_metrics = _query(srv["backend_uri"], "select count(*) from latest_metrics where run_uuid = %s and key = %s",
                       (lora.info.run_id, "test_accuracy"))[0][0]
    assert n_metrics == 1


def test_requests_without_valid_credentials_are_refused(team_server):
    srv = team_server
    runs_before = _query(srv["backend_uri"], "select count(*) from runs")[0][0]
    name = f"intruder-{secrets.token_hex(4)}"
    bad = {"no credentials": None, "wrong password": (srv["user"], srv["password"] + "x"),
           "unknown user": ("mallory", srv["password"])}
    for label, auth in bad.items():
        for path, body in (("/api/2.0/mlflow/experiments/create", {"name": name}),
                           ("/api/2.0/mlflow/runs/create", {"experiment_id": "0", "run_name": name})):
            status, headers, text = _http(srv, "POST", path, body, auth)
            assert status == 401, f"{label}: POST {path} -> {status} {text[:300]}"
            assert headers.get("WWW-Authenticate", "").startswith("Basic"), label
        status, _, _ = _http(srv, "GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default", auth=auth)
        assert status == 401, f"{label}: read -> {status}"
    # nothing of it reached the database
    assert _query(srv["backend_uri"], "select count(*) from runs")[0][0] == runs_before
    assert _query(srv["backend_uri"], "select count(*) from experiments where name = %s", (name,))[0][0] == 0

    # the very same requests with the admin's credentials go through: the 401s above were about credentials
    admin = (srv["user"], srv["password"])
    status, _, text = _http(srv, "GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default",
                            auth=admin)
    assert status == 200 and json.loads(text)["experiment"]["experiment_id"] == "0", text[:300]
    status, _, text = _http(srv, "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": "0", "run_name": name},
                            auth=admin)
    assert status == 200, text[:300]
    run_id = json.loads(text)["run"]["info"]["run_id"]
    assert _query(srv["backend_uri"], "select count(*) from runs")[0][0] == runs_before + 1
    assert _query(srv["backend_uri"], "select name from runs where run_uuid = %s", (run_id,)) == [(name,)]

    # the password is stored hashed in the auth database, never in clear text
    users = dict(_query(srv["auth_db_uri"], "select username, password_hash from users"))
    assert set(users) == {srv["user"]} and srv["password"] not in users[srv["user"]]


def test_a_sweep_without_credentials_fails_and_writes_nothing(tiny_bert, store, team_server):
    srv = team_server
    runs_before = _query(srv["backend_uri"], "select count(*) from runs")[0][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", *_sweep_overrides(tiny_bert, srv),
                           "tracking.experiment=no-credentials"], capture_output=True, text=True,
                          cwd=store["dir"], env=env, timeout=300)
    # bad input before anything starts: exit 2, one line naming the store and what to set
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "HTTP 401" in proc.stderr and "MLFLOW_TRACKING_USERNAME" in proc.stderr, \
        proc.stderr[-3000:]
    # refused before Ray was started: no trial trained for nothing
    assert not (Path(store["dir"]) / "ray_results").exists()
    assert _query(srv["backend_uri"], "select count(*) from runs")[0][0] == runs_before
    assert _query(srv["backend_uri"], "select count(*) from experiments where name = 'no-credentials'")[0][0] == 0


def test_server_and_database_listen_on_loopback_only(team_server):
    srv = team_server
    tree = _tree(srv["server"].pid)
    mlflow = [p for p in tree if "server" in p.cmdline() and any("mlflow" in a for a in p.cmdline()[:2])]
    assert mlflow, [p.cmdline() for p in tree]
    cmd = mlflow[0].cmdline()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1", cmd

    def listening(procs) -> list:
        return [conn.laddr for p in procs for conn in p.net_connections(kind="inet")
                if conn.status == psutil.CONN_LISTEN]

    server_socks = listening(tree)
    assert srv["port"] in {a.port for a in server_socks}, server_socks
    assert {a.ip for a in server_socks} == {"127.0.0.1"}, server_socks
    postmaster = psutil.Process(int((srv["pg_dir"] / "data" / "postmaster.pid").read_text().split()[0]))
    pg_socks = listening([postmaster])
    assert pg_socks and {a.ip for a in pg_socks} == {"127.0.0.1"}, pg_socks
    # whatever process it is, nothing listens on these ports on another address (0.0.0.0, ::, a LAN IP)
    ports = {srv["port"], *(a.port for a in pg_socks)}
    everywhere = [c.laddr for c in psutil.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]
    assert {a.ip for a in everywhere} == {"127.0.0.1"}, everywhere
    # and from a non-loopback address of this machine, if it has one, the server cannot be reached
    lan = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for ip in lan:
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((ip, srv["port"])) != 0, f"server reachable on {ip}"

    # secrets reach the processes through the environment and a 0600 file, never argv or the log
    pg_procs = [postmaster, *postmaster.children()]
    for p in tree + pg_procs:
        argv = " ".join(p.cmdline())
        assert srv["password"] not in argv and srv["pg_password"] not in argv, argv
    log = srv["log"].read_text(errors="replace")
    assert "basic auth on" in log
    assert srv["password"] not in log and srv["pg_password"] not in log
    pg_log = (srv["pg_dir"] / "postgres.log").read_text(errors="replace")
    assert "ready to accept connections" in pg_log and srv["pg_password"] not in pg_log
    for private in (srv["base"] / "mlflow" / "basic_auth.runtime.ini", srv["pg_dir"] / "backend.uri",
                    srv["pg_dir"] / "auth.uri"):  # the files that hold the database password
        assert private.stat().st_mode & 0o077 == 0, private
    assert srv["pg_password"] in (srv["base"] / "mlflow" / "basic_auth.runtime.ini").read_text()
