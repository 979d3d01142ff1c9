"""The real CLI end to end: Ray Tune schedules the trials, MLflow (sqlite) records them, the report
compares them with the full-FT arm, promotion registers and reloads the winner."""
import json
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from sweeps.cli import main
from tests.conftest import BIN, tiny_overrides
from trainers import record

pytestmark = pytest.mark.slow


def _sweep(store, overrides, timeout=600):
    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", *overrides], capture_output=True, text=True,
                          cwd=store["dir"], timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _runs(store):
    c = MlflowClient(store["uri"])
    exp = c.get_experiment_by_name("peftsweep")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(record.ROLE) == "sweep"]
    children = [r for r in runs if r.data.tags.get(record.ROLE) == "trial"]
    return c, parents, children


def test_sweep_report_promote(tiny_bert, tiny_sweep, capsys):
    store = tiny_sweep  # search=tiny, 3 steps, seeds 0 and 1: run once per session (tests/conftest.py)
    c, parents, children = _runs(store)

    # one parent, one child per arm and seed, all finished and nested under the parent
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["n_trials"] == "6"
    assert {r.data.tags[record.PARENT_RUN_ID] for r in children} == {parent.info.run_id}
    assert {r.data.params["method"] for r in children} == {"full", "lora"}
    assert sorted(r.data.params.get("r") for r in children if r.data.params["method"] == "lora") == ["4", "4", "8", "8"]
    assert sorted(r.data.params["seed"] for r in children) == ["0", "0", "0", "1", "1", "1"]
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags[record.STATUS] == "ok"
        assert r.data.params["sweep_id"] == parent.data.tags[record.SWEEP_ID]
        for m in ("test_accuracy", "val_accuracy", record.PEAK_HOST_RSS_GB, record.TRAIN_TIME_S,
                  record.TRAINABLE_PARAMS, record.ADAPTER_MB, record.WALL_TIME_S, record.TOKENS_PER_S):
            assert m in r.data.metrics, m
        # trials get the CPUs Ray granted them (1 each), not the whole machine
        assert r.data.params["num_threads"] == "1"
    # 6 trials on 2 slots: a slot's process runs its next trial (cluster.reuse_processes), imports paid once
    assert max(int(r.data.tags[record.TRIALS_BEFORE_IN_PROCESS]) for r in children) >= 1

    # the dashboard: a model-training experiment (MLflow 3 opens it on runs, not traces), and `peftsweep ui`'s
    # compare link names exactly this sweep's trials
    import urllib.parse

    from sweeps.cli import ui_links
    from sweeps.config import load

    assert c.get_experiment_by_name("peftsweep").tags["mlflow.experimentKind"] == "custom_model_development"
    links = ui_links(load([f"tracking.uri={store['uri']}"]), "http://127.0.0.1:5000")
    query = urllib.parse.parse_qs(links["compare"].split("#/compare-runs?", 1)[1])
    assert sorted(json.loads(query["runs"][0])) == sorted(r.info.run_id for r in children)
    assert links["report"].endswith(f"/runs/{parent.info.run_id}/artifacts/report/report.html")

    # report: every arm vs full FT, files written and logged to the parent
    assert main(["report", f"tracking.uri={store['uri']}"]) == 0
    report_md = capsys.readouterr().out
    assert "full-lr0.0001" in report_md and "lora-r4-a8" in report_md and "lora-r8-a16" in report_md
    logged = {f.path for f in c.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/pareto.png", "report/report.json",
            "report/heatmap_rank_modules.png"} <= logged
    assert "±" in report_md  # two seeds: every mean carries its confidence interval
    data = json.loads((next(store["dir"].glob("reports/*/report.json"))).read_text())
    full = next(a for a in data["arms"] if a["method"] == "full")
    assert full["test_delta_pts"] == 0 and full["peak_mem_gb_ratio"] == pytest.approx(1.0)
    for arm in data["arms"]:
        runs = [t for t in data["trials"] if t["arm"] == arm["arm"]]
        assert len(runs) == arm["runs_ok"] == 2
        assert arm["test_mean"] == pytest.approx(100 * sum(t["test_accuracy"] for t in runs) / 2)
        assert arm["test_ci95"] > 0 or runs[0]["test_accuracy"] == runs[1]["test_accuracy"]
    # --format json prints the same payload for scripts
    assert main(["report", f"tracking.uri={store['uri']}", "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["arms"] == data["arms"] and printed["sweep_id"] == parent.data.tags[record.SWEEP_ID]

    # the gate: a winner further below full FT than max_delta is refused and no alias is set
    assert main(["promote", f"tracking.uri={store['uri']}", "--max-delta", "-1000"]) == 1
    assert "promotion refused" in capsys.readouterr().err
    with pytest.raises(Exception):
        c.get_model_version_by_alias("rotten_tomatoes-tiny-bert", "champion")

    # promote: a registered version with alias champion that reloads to the logged metric
    assert main(["promote", f"tracking.uri={store['uri']}"]) == 0
    out = capsys.readouterr().out
    assert "alias @champion" in out
    version = c.get_model_version_by_alias("rotten_tomatoes-tiny-bert", "champion")
    winner = c.get_run(version.run_id)
    assert winner.data.params["method"] == "lora"
    assert version.tags["method"] == "lora" and version.tags["r"] == winner.data.params["r"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(winner.data.metrics["test_accuracy"])
    reproduced = float(version.tags["reload_check"].split("=")[1])
    assert abs(reproduced - winner.data.metrics["test_accuracy"]) * 100 <= 0.5
    # the exact base: a content hash of the tiny model's weights, as sha256 computes it here
    import hashlib
    from pathlib import Path

    weights = Path(tiny_bert, "model.safetensors")
    expected = hashlib.sha256(f"model.safetensors:{hashlib.sha256(weights.read_bytes()).hexdigest()}\n".encode())
    assert version.tags["base_model_sha256"] == expected.hexdigest() and version.tags["base_model"] == tiny_bert
    assert version.tags["quantization"] == "none" and "peftsweep report" in version.description
    files = {f.path for f in c.list_artifacts(version.run_id, "pyfunc_model/artifacts/adapter")}
    assert {"pyfunc_model/artifacts/adapter/adapter_model.safetensors",
            "pyfunc_model/artifacts/adapter/base_model.json",
            "pyfunc_model/artifacts/adapter/README.md"} <= files
    assert not any("model.safetensors" == Path(f).name for f in files)  # the adapter only, never the base

    # a second promotion by another rule adds version 2 and moves the alias; version 1 stays
    assert main(["promote", f"tracking.uri={store['uri']}", "--rule", "cheapest_within", "--within-points",
                 "100"]) == 0
    capsys.readouterr()
    assert str(c.get_model_version_by_alias("rotten_tomatoes-tiny-bert", "champion").version) == "2"
    assert c.get_model_version("rotten_tomatoes-tiny-bert", "1").run_id == version.run_id

    _champion_serves_like_direct_inference(store, c, winner)


def test_the_reload_check_reproduces_the_metric_promotion_compares(tiny_sweep, capsys):
    """Promoting by macro-F1 a sweep whose task metric is accuracy: the fresh-process check must reproduce
    test macro-F1, the figure the gate compares, not the adapter's own task metric."""
    store = tiny_sweep
    assert main(["promote", f"tracking.uri={store['uri']}", "task.metric=macro_f1"]) == 0, capsys.readouterr().err
    c = MlflowClient(store["uri"])
    version = c.get_model_version_by_alias("rotten_tomatoes-tiny-bert", "champion")
    logged = c.get_run(version.run_id).data.metrics
    metric, reproduced = version.tags["reload_check"].split("=")
    assert metric == "test_macro_f1" and float(reproduced) == pytest.approx(logged["test_macro_f1"], abs=1e-4)


def test_the_report_answers_with_paired_intervals_and_verdicts_recomputed_from_the_rows(tiny_sweep, capsys):
    """Each adapter arm's interval against full FT is the paired one over the test rows and both seeds, its
    verdict is read against the margin, and each child run carries both (the compare page sorts by them)."""
    import numpy as np

    from evaluation import paired
    from evaluation.verdicts import pooled_against
    from trainers.tracking import load_row_scores

    store = tiny_sweep
    assert main(["report", f"tracking.uri={store['uri']}", "--margin", "2", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    c, _, children = _runs(store)
    full = data["full_ft_arm"]
    assert full == "full-lr0.0001" and data["margin"] == 2.0 and "adapter arms are within 2 points" in data["answer"]
    runs = {}
    for r in children:
        runs.setdefault(r.data.tags[record.ARM], []).append(r)
    rows = {arm: [load_row_scores(c, r.info.run_id, "test") for r in sorted(rs, key=lambda r: r.data.params["seed"])]
            for arm, rs in runs.items()}
    assert len({r.data.params[record.row_ids_hash_param("test")] for r in children}) == 1  # one set of rows
    # every arm ran both seeds: the seed noise is pooled over the adapters' differences from full FT
    matrices = {arm: paired.row_matrix(frames)[1] for arm, frames in rows.items()}
    seeds = {arm: [0, 1] for arm in matrices}
    pooled = pooled_against(matrices, seeds, full)
    assert pooled is not None and pooled[1] == len(matrices) - 1  # a degree of freedom per adapter
    assert data["seed_noise"]["test"]["source"] == "measured" and data["seed_noise"]["test"]["df"] == pooled[1]
    # the tie set: the adapters whose validation interval against the best (seeds counted) holds 0, no other cut
    tied = {a["arm"] for a in data["arms"] if a["method"] not in ("full", "base") and a["arm"] != data["best_val_arm"]
            and a["val_vs_best_low"] <= 0 <= a["val_vs_best_high"]}
    assert set(data["val_tie_set"]) == tied | {data["best_val_arm"]}
    assert data["best_val_arm"] in data["val_shippable"] and set(data["val_shippable"]) <= set(data["val_tie_set"])
    for arm in data["arms"]:
        if arm["method"] == "full":
            continue
        a, b = matrices[arm["arm"]], matrices[full]
        diff = paired.paired_diff_ci(a, b, seeds_a=[0, 1], seeds_b=[0, 1], pooled=pooled)
        assert arm["test_vs_full_mean"] == pytest.approx(100 * diff.mean, abs=1e-9)
        assert arm["test_vs_full_low"] == pytest.approx(100 * diff.low, abs=1e-6)
        assert arm["test_vs_full_high"] == pytest.approx(100 * diff.high, abs=1e-6)
        assert arm["test_vs_full_verdict"] == paired.verdict(100 * diff.low, 100 * diff.high, 2.0)
        assert np.isclose(arm["test_mean"], 100 * a.mean())
        for r in runs[arm["arm"]]:
            logged = c.get_run(r.info.run_id).data
            assert logged.tags["peftsweep.test_vs_full_verdict"] == arm["test_vs_full_verdict"]
            assert logged.metrics["test_vs_full_low"] == pytest.approx(arm["test_vs_full_low"])


TEXTS = ["a warm, funny and beautifully acted film", "tedious, overlong and badly written",
         "the plot goes nowhere", "one of the best movies of the year"]


def _champion_serves_like_direct_inference(store, c, winner, uri="models:/rotten_tomatoes-tiny-bert@champion",
                                           column="text", inputs=TEXTS):
    """models:/…@champion through pyfunc in a fresh process, and through `mlflow models serve` over HTTP,
    give the same answers (labels, or generated text) as loading the trial's adapter directly."""
    import os
    import socket
    import time
    import urllib.request

    from trainers import load_trained, predict_texts

    local = c.download_artifacts(winner.info.run_id, record.ADAPTER_DIR, str(store["dir"]))
    model, tok, cfg = load_trained(local)
    direct = predict_texts(model, tok, cfg, inputs)
    # the server launches `uvicorn` by name: the venv must be on PATH, as after `source .venv/bin/activate`
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    fresh = subprocess.run([str(BIN / "python"), "-c",
                            "import json, sys, mlflow, pandas; m = mlflow.pyfunc.load_model(sys.argv[1]); "
                            "print(json.dumps(list(m.predict(pandas.DataFrame({sys.argv[3]: json.loads(sys.argv[2])})))))",
                            uri, json.dumps(inputs), column], capture_output=True, text=True, env=env, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert json.loads(fresh.stdout.strip().splitlines()[-1]) == direct

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=store["dir"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = json.dumps({"dataframe_records": [{column: t} for t in inputs]}).encode()
        deadline, answer = time.time() + 180, None
        while time.time() < deadline and answer is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                time.sleep(1)
        assert answer is not None, "no answer from mlflow models serve within 180 s"
        assert answer["predictions"] == direct
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_a_failing_or_killed_trial_is_recorded_retried_and_the_sweep_goes_on(tiny_bert, store, capsys):
    """One sweep, three trials: one trains, one raises, one's process is SIGKILLed (OOM killer, lost node). The
    raising trial records its own error; the killed one cannot record anything, so the sweep closes its run as
    failed; with cluster.max_failures=1 Ray retries each failure once, as a new run; nothing is left RUNNING."""
    _sweep(store, ["search=tiny", "search.full_ft_arm=false", "search.space.method.r=[4]",
                   "+search.space.train.inject_fault=[null,raise@1,kill@1]", "train.max_steps=3",
                   "cluster.max_failures=1", *tiny_overrides(tiny_bert, store)])
    _, parents, children = _runs(store)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(r.info.status != "RUNNING" for r in children + parents)
    by_fault = {}
    for r in children:
        by_fault.setdefault(r.data.tags[record.ARM].split("inject_fault=")[1], []).append(r)
    assert [r.data.tags[record.STATUS] for r in by_fault.pop("None")] == ["ok"]
    raised = by_fault.pop("raise@1")
    assert len(raised) == 2  # the attempt and its retry, each recording its own error
    assert all(r.info.status == "FAILED" and r.data.tags[record.STATUS] == "failed"
               and "injected fault at step 1" in r.data.tags[record.ERROR] for r in raised)
    killed = by_fault.pop("kill@1")
    assert len(killed) == 2 and not by_fault  # the attempt and its retry (killed again)
    assert all(r.data.tags[record.STATUS] == "failed" and "ended without recording an outcome" in
               r.data.tags[record.ERROR] for r in killed)
    # the report still comes out, naming the failed runs and why; no full-FT arm means no deltas
    assert main(["report", f"tracking.uri={store['uri']}"]) == 0
    md = next(store["dir"].glob("reports/*/report.md")).read_text()
    assert "Runs that did not finish ok (4 of 5)" in md and "RuntimeError: injected fault at step 1" in md
    assert "no full fine-tuning arm" in md


def test_asha_prunes_trailing_trials(tiny_bert, store):
    """ASHA stops trials at rungs; each stopped trial's run says `pruned` and at which step."""
    _sweep(store, ["search=tiny", "search.full_ft_arm=false", "search.space.method.r=[2,4,8]",
                   "+search.space.train.lr=[1e-4,3e-2]", "scheduler=asha", "scheduler.max_t=6",
                   "scheduler.grace_period=1", "scheduler.reduction_factor=2", "search.metric=val_loss",
                   "search.mode=min", "train.eval_every_steps=1", "train.max_steps=6",
                   *tiny_overrides(tiny_bert, store)])
    _, parents, children = _runs(store)
    assert len(children) == 6
    statuses = [r.data.tags[record.STATUS] for r in children]
    assert "pruned" in statuses and "ok" in statuses, statuses
    assert set(statuses) <= {"ok", "pruned"}
    for r in children:
        assert r.info.status == "FINISHED"
        if r.data.tags[record.STATUS] == "pruned":
            assert 1 <= int(r.data.tags[record.PRUNED_AT_STEP]) < 6


def _count_ok(db) -> int:
    """Finished trials, read with plain sqlite: an MlflowClient here would race the driver's schema set-up."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from tags where key = ? and value = 'ok'",
                                (record.STATUS,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def _running_at_step(db, step: int) -> str | None:
    """A RUNNING trial run that has logged an evaluation at `step` or later (so it has checkpointed there)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("select r.run_uuid from runs r join metrics m on m.run_uuid = r.run_uuid "
                               "where r.status = 'RUNNING' and m.key = ? and m.step >= ? limit 1",
                               (record.TRAIN_LOSS, step)).fetchone()
            return row[0] if row else None
    except sqlite3.Error:
        return None


def test_resume_after_the_driver_is_killed(tiny_bert, store):
    """SIGKILL the sweep driver after the first trial finished and while the second has checkpointed;
    `--resume` finishes the sweep without re-running finished trials, continues the interrupted one from its
    checkpoint in its own MLflow run, and no MLflow run is left RUNNING."""
    import os
    import signal
    import time

    # the tiny model takes ~100 steps a second: 1,500 steps leave time to catch the second trial mid-run
    args = [*tiny_overrides(tiny_bert, store), "search=tiny", "search.full_ft_arm=false", "search.space.method.r=[2,4]",
            "cluster.max_concurrent_trials=1", "task.train_size=400", "train.epochs=30", "train.max_steps=1500",
            "train.eval_every_steps=100", "train.checkpoint_every_steps=100"]
    # Tune snapshots which checkpoint each trial has reached every >= 10 s by default; a driver killed sooner
    # after one resumes from the one before it (still correct). Every second here, so the test needs no sleep.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen([str(BIN / "peftsweep"), "sweep", *args], cwd=store["dir"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, interrupted = time.time() + 300, None
    while time.time() < deadline and driver.poll() is None:
        if _count_ok(store["dir"] / "mlflow.db") >= 1:
            interrupted = _running_at_step(store["dir"] / "mlflow.db", 200)
            if interrupted:
                time.sleep(1.5)  # one experiment snapshot after the step-200 checkpoint
                break
        time.sleep(0.3)
    assert driver.poll() is None and interrupted, "the sweep finished before it could be killed: make trials longer"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    _, _, before = _runs(store)
    finished_before = {r.data.tags[record.TRIAL_KEY] for r in before if r.data.tags.get(record.STATUS) == "ok"}

    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", "--resume", f"tracking.uri={store['uri']}"],
                          capture_output=True, text=True, cwd=store["dir"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, parents, children = _runs(store)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(r.info.status != "RUNNING" for r in children)
    ok = [r for r in children if r.data.tags[record.STATUS] == "ok"]
    keys = [r.data.tags[record.TRIAL_KEY] for r in ok]
    assert len(keys) == len(set(keys)) == 2, "each configuration finished exactly once"
    assert finished_before <= set(keys)
    rerun = [r for r in ok if r.data.tags[record.TRIAL_KEY] in finished_before and r.info.run_id not in
             {b.info.run_id for b in before}]
    assert not rerun, "a trial finished before the crash was trained again"
    # the interrupted trial went on from its checkpoint, in the run it had begun, to its last step
    (resumed,) = [r for r in children if r.info.run_id == interrupted]
    assert resumed.data.tags[record.STATUS] == "ok" and int(resumed.data.tags[record.RESUMED_FROM_STEP]) >= 200
    assert resumed.data.metrics[record.STEP] == 1500 and record.ERROR not in resumed.data.tags


@pytest.mark.parametrize("searcher,samples", [("random", 2), ("optuna", 3)])
def test_random_and_optuna_searchers_sample_the_space(tiny_bert, store, searcher, samples):
    _sweep(store, ["search=tiny", "search.full_ft_arm=false", "search.space.method.r=[4]",
                   "+search.space.train.lr={loguniform:[1e-4,1e-2]}", f"searcher={searcher}",
                   f"search.num_samples={samples}", "train.max_steps=2", *tiny_overrides(tiny_bert, store)])
    _, _, children = _runs(store)
    assert len(children) == samples and all(r.data.tags[record.STATUS] == "ok" for r in children)
    lrs = [float(r.data.params["lr"]) for r in children]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == samples


def test_a_qlora_champion_reloads_quantized_and_reports_merge_damage(tiny_bert, store, capsys):
    """An adapter trained on an nf4 base is registered as trained (the registry reloads it onto the nf4 base
    and reproduces its metric) and is also scored merged into the full-precision base."""
    _sweep(store, ["search=tiny", "search.full_ft_arm=false", "search.space.method.r=[4]", "quant=nf4",
                   "train.max_steps=3", *tiny_overrides(tiny_bert, store)])
    c, _, [child] = _runs(store)
    assert child.data.params["quantization"] == "nf4" and child.data.tags[record.STATUS] == "ok"
    assert main(["promote", f"tracking.uri={store['uri']}"]) == 0
    out = capsys.readouterr().out
    assert "Merged into the full-precision base" in out
    version = c.get_model_version_by_alias("rotten_tomatoes-tiny-bert", "champion")
    assert version.tags["quantization"] == "nf4"
    merged = float(version.tags["merged_fp_test_accuracy"])
    logged = child.data.metrics["test_accuracy"]
    assert float(version.tags["merge_damage_pts"]) == pytest.approx(round(100 * (logged - merged), 2))
    assert c.get_run(child.info.run_id).data.metrics["merged_fp_test_accuracy"] == pytest.approx(merged)
    assert abs(float(version.tags["reload_check"].split("=")[1]) - logged) * 100 <= 0.5
