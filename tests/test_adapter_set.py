"""Adapter sets and export (issue 25): several promoted adapters of one base served by one `mlflow models serve`
process in mixed batches, each row answering as its adapter alone does with plain peft; the refusals (other
base, DoRA, unknown adapter, what vLLM rejects); vLLM and merged exports that load with plain peft and plain
transformers. Real sweeps, real promotions, real MLflow (sqlite) and HTTP."""
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from sweeps.cli import main
from tests.conftest import BIN, copy_store, tiny_overrides
from tests.test_e2e import TEXTS, _sweep
from trainers import record

pytestmark = pytest.mark.slow

MODEL = "rotten_tomatoes-tiny-bert"


@pytest.fixture(scope="session")  # once per run, whatever runs between its readers
def two_sweeps_once(tiny_sweep_once, tiny_bert, tmp_path_factory) -> dict:
    """The session's tiny sweep, promoted (`rotten_tomatoes-tiny-bert@champion`), and in the same store a second
    real sweep on the same tiny BERT: two LoRA arms on every linear layer, no full FT, a learning rate and epochs
    at which the adapters answer differently row by row, and the label order reversed (index 0 is `rotten`), so
    a row answered by the wrong adapter shows. The second sweep is promoted twice, by accuracy (`rt-b`, its best
    arm) and by macro-F1 under a memory budget only its other arm fits (`rt-b-f1`)."""
    from trainers.tracking import find_parent

    store = copy_store(tiny_sweep_once, tmp_path_factory.mktemp("two-sweeps"))
    first = find_parent(MlflowClient(store["uri"]), "peftsweep").data.tags[record.SWEEP_ID]
    assert main(["promote", f"tracking.uri={store['uri']}", "--sweep", first]) == 0
    _sweep(store, ["search=tiny", "search.full_ft_arm=false", "search.space.method.r=[2,8]", "train.lr=0.02",
                   "train.epochs=20", "method.target_modules=all_linear", "task.labels=[rotten,fresh]", "name=rt-b",
                   *tiny_overrides(tiny_bert, store)])
    assert main(["promote", f"tracking.uri={store['uri']}"]) == 0
    # by macro-F1, the best arm that fits under the other arm's peak memory: `best` would ship the top arm by
    # either metric (no cheaper one is shown within the margin of it on 32 rows), and the set needs a third adapter
    from evaluation.report import arm_table
    from evaluation.runs import trial_table

    c = MlflowClient(store["uri"])
    champion = c.get_run(c.get_model_version_by_alias("rt-b", "champion").run_id).data.tags[record.ARM]
    table = arm_table(trial_table(c, find_parent(c, "peftsweep")), "macro_f1")
    other = table[table["arm"] != champion].sort_values("peak_mem_gb").iloc[0]
    assert other["peak_mem_gb"] < table[table["arm"] == champion].iloc[0]["peak_mem_gb"]  # r2 holds less than r8
    assert main(["promote", f"tracking.uri={store['uri']}", "task.metric=macro_f1", "promote.registered_model=rt-b-f1",
                 "--rule", "best_under_budget", "--memory-budget-gb", repr(float(other["peak_mem_gb"]))]) == 0
    return store


@pytest.fixture
def two_sweeps(two_sweeps_once, tmp_path, monkeypatch) -> dict:
    """A private copy of the two promoted sweeps' store, the test running inside it."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.chdir(tmp_path)
    utils._artifact_repos_cache.clear()  # as tests/conftest.py tiny_sweep: a copy's runs keep their ids
    return copy_store(two_sweeps_once, tmp_path)


def _port() -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        return 200, json.loads(urllib.request.urlopen(req, timeout=60).read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _alone(client, version, texts, store):
    """What a registered adapter answers loaded alone with plain peft (the base, then PeftModel.from_pretrained),
    through the trial's own scoring code."""
    from trainers import load_trained, predict_texts

    local = client.download_artifacts(version.run_id, record.ADAPTER_DIR, str(store["dir"] / version.run_id))
    model, tokenizer, cfg = load_trained(local)
    return predict_texts(model, tokenizer, cfg, texts)


def test_one_served_set_answers_mixed_rows_as_each_adapter_alone(tiny_bert, two_sweeps, capsys):
    store = two_sweeps
    c = MlflowClient(store["uri"])
    versions = {"a": c.get_model_version_by_alias(MODEL, "champion"),
                "b": c.get_model_version_by_alias("rt-b", "champion"),
                "b-f1": c.get_model_version_by_alias("rt-b-f1", "champion")}
    # three different trained adapters, of two sweeps
    assert len({v.run_id for v in versions.values()}) == 3
    assert len({c.get_run(v.run_id).data.params["sweep_id"] for v in versions.values()}) == 2

    code = main(["serve-set", "-a", f"a=models:/{MODEL}@champion", "-a", "b=models:/rt-b@champion",
                 "-a", "b-f1=models:/rt-b-f1/1", "--name", "rt-set", f"tracking.uri={store['uri']}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Registered rt-set version 1, alias @champion: 3 adapters on one base" in out.out
    version = c.get_model_version_by_alias("rt-set", "champion")
    assert version.tags["peftsweep.adapter_set"] == "true"
    assert set(json.loads(version.tags["reload_check"])) == {"a", "b", "b-f1"}
    # the registered set holds the three adapters only, never the base's weights
    files = [f.path for f in c.list_artifacts(version.run_id, "pyfunc_model/artifacts/adapters/a")]
    assert "pyfunc_model/artifacts/adapters/a/adapter_model.safetensors" in files
    assert not any(f.endswith("/model.safetensors") for f in files)

    # what each adapter, and the untouched base, answers alone
    direct = {name: _alone(c, v, TEXTS, store) for name, v in versions.items()}
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainers import BASE_HEAD_SEED

    torch.manual_seed(BASE_HEAD_SEED)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.no_grad():
        logits = base(**tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits
    direct["__base__"] = [["fresh", "rotten"][i] for i in logits.argmax(-1).tolist()]
    # the adapters do not all answer alike: a row served by the wrong adapter would show
    assert len({tuple(v) for v in direct.values()}) >= 2, direct

    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    port = _port()
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/rt-set@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              cwd=store["dir"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        # one request, every adapter and the base interleaved row by row
        names = ["a", "b", "b-f1", "__base__"]
        rows = [{"text": t, "adapter": n} for i, t in enumerate(TEXTS) for n in names[i % 4:] + names[:i % 4]]
        deadline, answer = time.time() + 180, None
        while answer is None and time.time() < deadline:
            try:
                answer = _post(port, {"dataframe_records": rows})
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                time.sleep(1)
        assert answer is not None, "no answer from mlflow models serve within 180 s"
        status, body = answer
        assert status == 200, body
        expected = [direct[r["adapter"]][TEXTS.index(r["text"])] for r in rows]
        assert body["predictions"] == expected

        # one adapter for the whole request, by params
        status, body = _post(port, {"dataframe_records": [{"text": t} for t in TEXTS], "params": {"adapter": "b-f1"}})
        assert status == 200 and body["predictions"] == direct["b-f1"]

        # an unknown adapter fails that request, with one line naming what the set serves; the server goes on
        status, body = _post(port, {"dataframe_records": [{"text": TEXTS[0], "adapter": "nope"}]})
        assert status == 400 and "unknown adapter 'nope'; this set serves a, b, b-f1 and __base__" in body["message"]
        status, body = _post(port, {"dataframe_records": [{"text": TEXTS[0]}]})
        assert status == 400 and "rows name no adapter" in body["message"]
        status, body = _post(port, {"dataframe_records": [{"text": TEXTS[1], "adapter": "b"}]})
        assert status == 200 and body["predictions"] == direct["b"][1:2]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _register_edited(c, store, uri: str, name: str, edit, **tags) -> str:
    """A copy of a registered adapter with its files edited by `edit(adapter_folder)`, registered as `name`
    the way promotion registers (a run's pyfunc folder, the same tags): what a DoRA adapter or an adapter of
    another base looks like to the registry, without training one."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=store["uri"],
                                                dst_path=str(store["dir"] / f"edit-{name}"))
    edit(Path(local, "artifacts", "adapter"))
    source = c.get_model_version_by_alias(uri.split("/")[1].split("@")[0], "champion")
    run = c.create_run(c.get_experiment_by_name("peftsweep").experiment_id, run_name=f"edited-{name}")
    c.log_artifacts(run.info.run_id, local, "pyfunc_model")
    c.create_registered_model(name)
    v = c.create_model_version(name, f"{run.info.artifact_uri}/pyfunc_model", run.info.run_id,
                               tags={**source.tags, **tags})
    c.set_registered_model_alias(name, "champion", v.version)
    return f"models:/{name}@champion"


def _edit_json(file: str, **values):
    def edit(folder: Path):
        data = json.loads((folder / file).read_text())
        data.update(values)
        (folder / file).write_text(json.dumps(data))
    return edit


def _refused(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, not a traceback
    return err


def test_sets_and_vllm_exports_refuse_what_cannot_be_served_together(two_sweeps, capsys):
    store = two_sweeps
    c = MlflowClient(store["uri"])
    champion = f"models:/{MODEL}@champion"
    other_base = _register_edited(c, store, champion, "other-base", _edit_json("base_model.json", sha256="0" * 64),
                                  base_model_sha256="0" * 64)
    dora = _register_edited(c, store, champion, "dora", _edit_json("adapter_config.json", use_dora=True))
    wide = _register_edited(c, store, champion, "wide", _edit_json("adapter_config.json", r=1024))
    uri = f"tracking.uri={store['uri']}"

    err = _refused(capsys, ["serve-set", "-a", champion, "-a", other_base, uri])
    assert "other-base and rotten_tomatoes-tiny-bert differ in base (sha256 0000000000000000…" in err
    err = _refused(capsys, ["serve-set", "-a", champion, "-a", dora, uri])
    assert "dora (models:/dora/1) is a DoRA adapter: PEFT's mixed batches do not support DoRA; serve it alone" in err
    err = _refused(capsys, ["serve-set", "-a", champion, "-a", f"{MODEL}={champion}", uri])
    assert "two adapters named 'rotten_tomatoes-tiny-bert'" in err
    # by default every champion of one base: here two bases have champions
    err = _refused(capsys, ["serve-set", uri])
    assert "@champion adapters of 2 bases" in err and "pick one with --base" in err
    assert not [m for m in c.search_registered_models() if m.name.endswith("-set")]  # nothing registered

    out = store["dir"] / "vllm"
    err = _refused(capsys, ["export", "--format", "vllm", "-a", champion, str(out), uri])
    assert "vLLM supports modules_to_save only as None, this trains ['classifier', 'score']" in err
    err = _refused(capsys, ["export", "--format", "vllm", "-a", dora, str(out), uri])
    assert "vLLM does not support DoRA" in err
    err = _refused(capsys, ["export", "--format", "vllm", "-a", wide, str(out), uri])
    assert "rank 1024 is above vLLM's largest --max-lora-rank, 512" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_merged_export_loads_with_plain_transformers_and_predicts_as_the_adapter(two_sweeps, tiny_bert, capsys):
    store = two_sweeps
    c = MlflowClient(store["uri"])
    out = store["dir"] / "merged"
    assert main(["export", "--format", "merged", "-a", "b=models:/rt-b-f1@champion", str(out),
                 f"tracking.uri={store['uri']}"]) == 0
    printed = capsys.readouterr().out
    assert f"b: merged weights and tokenizer in {out}/b/" in printed and "Merge damage check: test accuracy" in printed
    assert "(+0.00 pts lost)" in printed  # merged into the same full-precision base it was trained on

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert (out / "b" / "model.safetensors").exists() and not (out / "b" / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out / "b").eval()
    tok = AutoTokenizer.from_pretrained(out / "b")
    with torch.no_grad():
        logits = model(**tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits
    merged = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    assert merged == _alone(c, c.get_model_version_by_alias("rt-b-f1", "champion"), TEXTS, store)
    assert tiny_bert not in (out / "b" / "config.json").read_text()  # no path of this machine


PROMPTS = ["Write the headline of this article: Shares in the firm rose 5% after strong results.",
           "Write the headline of this article: The match ended in a draw after a late goal.",
           "Write the headline of this article: Rain is expected across the north tomorrow."]


@pytest.fixture(scope="session")  # once per run, whatever runs between its readers
def sft_champions_once(tiny_llama, tmp_path_factory) -> dict:
    """Two sft LoRA adapters on the tiny Llama (BBC headlines, 4 steps, two learning rates so they write
    differently), trained by real trials and registered as promotion registers a champion (the adapter, its
    base's hash, the pyfunc), as `sft-a` and `sft-b`; no sweep around them: a set reads the registry only."""
    from sweeps.config import load
    from evaluation.serving import save_pyfunc
    from trainers import run_trial, write_base_reference

    out = tmp_path_factory.mktemp("sft-set")
    store = {"uri": f"sqlite:///{out / 'mlflow.db'}", "artifacts": str(out / "mlartifacts"), "dir": out}
    c = MlflowClient(store["uri"])
    for name, lr, r in (("sft-a", 0.05, 4), ("sft-b", 0.01, 8)):
        cfg = load(["task=bbc_headlines", f"model.path={tiny_llama}", "model.name=tiny-llama", "task.train_size=16",
                    "task.validation_size=4", "task.test_size=4", "task.generation_rows=4", "task.max_new_tokens=6",
                    "train.batch_size=4", "train.max_steps=4", f"train.lr={lr}", f"method.r={r}",
                    f"tracking.uri={store['uri']}", f"tracking.artifact_location={store['artifacts']}"]).trial
        result = run_trial(cfg)
        assert result["status"] == "ok", result
        run_id = result["mlflow_run_id"]
        weights = c.download_artifacts(run_id, record.ADAPTER_DIR, str(out / run_id))
        write_base_reference(weights)
        c.log_artifacts(run_id, save_pyfunc(weights, str(out / run_id / "pyfunc_model"), True), "pyfunc_model")
        c.create_registered_model(name)
        ref = json.loads(Path(weights, "base_model.json").read_text())
        v = c.create_model_version(name, f"{c.get_run(run_id).info.artifact_uri}/pyfunc_model", run_id,
                                   tags={"base_model": ref["path"], "base_model_sha256": ref["sha256"]})
        c.set_registered_model_alias(name, "champion", v.version)
    return store


@pytest.fixture
def sft_champions(sft_champions_once, tmp_path, monkeypatch) -> dict:
    from mlflow.tracking._tracking_service import utils

    monkeypatch.chdir(tmp_path)
    utils._artifact_repos_cache.clear()
    return copy_store(sft_champions_once, tmp_path)


def test_an_sft_set_generates_each_row_as_its_adapter_alone(sft_champions, tiny_llama, capsys):
    import mlflow

    store = sft_champions
    c = MlflowClient(store["uri"])
    # no adapter named: every champion of the one base in the registry
    assert main(["serve-set", f"tracking.uri={store['uri']}"]) == 0, capsys.readouterr().err
    assert "Registered tiny-llama-set version 1, alias @champion: 2 adapters" in capsys.readouterr().out
    # its fresh-process check regenerated each adapter's logged test generations in one mixed request
    assert json.loads(c.get_model_version_by_alias("tiny-llama-set", "champion").tags["reload_check"]) == {
        "sft-a": 1.0, "sft-b": 1.0}

    direct = {n: _alone(c, c.get_model_version_by_alias(n, "champion"), PROMPTS, store) for n in ("sft-a", "sft-b")}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sweeps.config import load
    from trainers import predict_texts

    cfg = load(["task=bbc_headlines", "task.max_new_tokens=6"]).trial
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    direct["__base__"] = predict_texts(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tok, cfg, PROMPTS)
    assert len({tuple(v) for v in direct.values()}) == 3, direct  # each writes its own text

    model = mlflow.pyfunc.load_model("models:/tiny-llama-set@champion")
    names = ["sft-a", "sft-b", "__base__"]
    rows = [(p, names[(i + j) % 3]) for i, p in enumerate(PROMPTS) for j in range(3)]
    answers = model.predict(pd.DataFrame({"prompt": [p for p, _ in rows], "adapter": [n for _, n in rows]}))
    assert list(answers) == [direct[n][PROMPTS.index(p)] for p, n in rows]


def test_a_vllm_export_loads_with_plain_peft_and_names_no_machine_path(sft_champions, tiny_llama, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = sft_champions
    c = MlflowClient(store["uri"])
    out = store["dir"] / "vllm"
    assert main(["export", "--format", "vllm", str(out), f"tracking.uri={store['uri']}"]) == 0
    printed = capsys.readouterr().out
    command = (out / "vllm_serve.sh").read_text().splitlines()[-1]
    # ranks 4 and 8 fit vLLM's --max-lora-rank 8; both adapters may share a batch
    assert command == (f"exec vllm serve {tiny_llama} --enable-lora --lora-modules sft-a={out.resolve()}/sft-a "
                       f"sft-b={out.resolve()}/sft-b --max-lora-rank 8 --max-loras 2")
    assert command[len("exec "):] in printed
    from trainers import predict_texts
    from sweeps.config import load

    cfg = load(["task=bbc_headlines", "task.max_new_tokens=6"]).trial
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for name in ("sft-a", "sft-b"):
        text = (out / name / "adapter_config.json").read_text()
        config = json.loads(text)
        assert config["base_model_name_or_path"] == "tiny-llama" and config["peft_type"] == "LORA"
        assert tiny_llama not in text and str(store["dir"]) not in text and '"/' not in text
        assert sorted(p.name for p in (out / name).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / name).eval()
        assert predict_texts(model, tok, cfg, PROMPTS) == _alone(
            c, c.get_model_version_by_alias(name, "champion"), PROMPTS, store)
