"""One trial without Ray: what it trains, what it records, and that failure is recorded, not lost."""
import pytest
import torch
from mlflow.tracking import MlflowClient

from trainers import record
from trainers.config import trial_config_from_dict, trial_config_to_dict, TrialConfig
from trainers.trial import run_trial


def _cfg(tiny_bert, store, **method):
    data = trial_config_to_dict(TrialConfig())
    data["model"].update(path=tiny_bert, name="tiny-bert")
    data["task"].update(train_size=48, validation_size=32, test_size=48)
    data["train"].update(batch_size=8, max_steps=4)
    data["tracking"].update(uri=store["uri"], artifact_location=store["artifacts"])
    data["method"].update(method)
    return trial_config_from_dict(data)


def _peft_count(tiny_bert, targets, r):
    """peft's own count for the intended config, built without our code."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=2 * r,
                                                  target_modules=targets))
    return peft_model.get_nb_trainable_parameters()[0]


# closed form for the tiny BERT (hidden 32, MLP 64, 2 layers), r=4: r·(in+out) per adapted layer + the
# 2-class head (32·2 + 2 = 66). q,v: 2 layers × 2 × 4·64 = 1,024. all linear: per layer q,k,v,o 4 × 256
# + intermediate 4·96 + output 4·96 = 1,792; × 2 + pooler 256 = 3,840.
@pytest.mark.parametrize("preset,targets,closed_form", [("attention_qv", ["query", "value"], 1024 + 66),
                                                        ("all_linear", ["query", "key", "value", "dense"], 3840 + 66)])
def test_trial_records_everything_and_counts_like_peft(tiny_bert, store, preset, targets, closed_form):
    cfg = _cfg(tiny_bert, store, r=4, alpha=8, target_modules=preset)
    out = run_trial(cfg)
    assert out["status"] == "ok"
    assert out[record.TRAINABLE_PARAMS] == _peft_count(tiny_bert, targets, 4) == closed_form
    run = MlflowClient(store["uri"]).get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[record.STATUS] == "ok"
    for name in ("model", "task", "method", "r", "alpha", "dropout", "target_modules", "target_modules_resolved",
                 "quantization", "lr", "batch_size", "grad_accum", "max_steps", "seed"):
        assert name in run.data.params, name
    for name in (record.PEAK_HOST_RSS_GB, record.WALL_TIME_S, record.TRAIN_TIME_S, record.EVAL_TIME_S,
                 record.TOKENS_PER_S, record.TRAINABLE_PARAMS, record.TOTAL_PARAMS, record.TRAINABLE_PCT,
                 record.ADAPTER_MB, "test_accuracy", "val_accuracy", "test_macro_f1", record.TRAIN_LOSS):
        assert name in run.data.metrics, name
    assert record.PEAK_VRAM_RESERVED_GB not in run.data.metrics  # CPU: absent, not zero
    for tag in (record.DEVICE, record.GIT_COMMIT, record.VERSION_TAG_PREFIX + "peft", record.ARM):
        assert run.data.tags.get(tag), tag
    files = {f.path for f in MlflowClient(store["uri"]).list_artifacts(run.info.run_id, record.ADAPTER_DIR)}
    assert {f"{record.ADAPTER_DIR}/adapter_model.safetensors", f"{record.ADAPTER_DIR}/adapter_config.json",
            f"{record.ADAPTER_DIR}/{record.TRIAL_CONFIG_FILE}"} <= files
    assert not any(f.endswith(".bin") for f in files)
    resolved = run.data.params["target_modules_resolved"]
    assert all(t in resolved for t in targets)
    # CPU: every dropout (embeddings, 3 a layer, head, and one an adapted module) draws the cheaper mask
    adapted = 2 * len(targets) if preset == "attention_qv" else 2 * 6 + 1
    assert run.data.params["fast_cpu_dropout"] == "True"
    assert int(run.data.params["cpu_dropout_modules"]) == 1 + 3 * 2 + 1 + adapted


def test_trial_trains_only_the_adapter(tiny_bert, store):
    """The frozen base must not move; the adapter must."""
    from trainers import data, loop
    from trainers.methods import apply_method
    from trainers.model import load_model, load_tokenizer
    from trainers.modules import resolve_target_modules

    cfg = _cfg(tiny_bert, store)
    tok = load_tokenizer(cfg)
    net = load_model(cfg, 2, tok, "cpu")
    net = apply_method(net, cfg.method, resolve_target_modules(net, "attention_qv"), "classification")
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ds = data.tokenize_classification(data.load_splits(cfg.task)["train"], tok, 32)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=data.collate(tok))
    loop.train(net, loader, cfg.train, "cpu")
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(("lora_" in n) or ("classifier" in n) for n in moved), moved


def test_a_crashing_trial_is_recorded_failed_with_its_error(tiny_bert, store):
    cfg = _cfg(tiny_bert, store)
    cfg.train.inject_fault = "raise@2"
    with pytest.raises(RuntimeError, match="injected fault at step 2"):
        run_trial(cfg)
    c = MlflowClient(store["uri"])
    (run,) = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[record.STATUS] == "failed"
    assert "injected fault at step 2" in run.data.tags[record.ERROR]


def test_an_oom_is_recorded_oom(tiny_bert, store):
    cfg = _cfg(tiny_bert, store)
    cfg.train.inject_fault = "oom@1"
    with pytest.raises(torch.OutOfMemoryError):
        run_trial(cfg)
    c = MlflowClient(store["uri"])
    (run,) = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    assert run.data.tags[record.STATUS] == "oom" and run.info.status == "FAILED"


def test_secrets_never_reach_mlflow(tiny_bert, store, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "s3cr3t-value-42")
    cfg = _cfg(tiny_bert, store)
    # secrets pasted where they get logged: a param, and the error text of a failing trial
    cfg.model.name = "tiny-hf_abcdefghijklmnopqrstuvwxyz012345"
    cfg.train.inject_fault = "raise@0"
    import trainers.trial as trial_mod

    monkeypatch.setattr(trial_mod, "fault_hook_for", lambda spec, batch=0: _raise_with("s3cr3t-value-42"))
    with pytest.raises(RuntimeError):
        run_trial(cfg)
    c = MlflowClient(store["uri"])
    (run,) = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    everything = str(run.data.params) + str(run.data.tags)
    assert run.data.tags[record.STATUS] == "failed" and "***" in run.data.tags[record.ERROR]
    assert "hf_abcdefghijklmnopqrstuvwxyz012345" not in everything
    assert "s3cr3t-value-42" not in everything


def _raise_with(secret):
    def hook(step):
        raise RuntimeError(f"could not reach service with password {secret}")
    return hook


def test_an_oom_is_retried_with_half_the_micro_batch_and_the_same_effective_batch(tiny_bert, store):
    from trainers.trial import run_trial_with_oom_retries

    cfg = _cfg(tiny_bert, store)  # micro-batch 8
    cfg.train.inject_fault = "oom@1:bs>4"  # out of memory at micro-batch 8, fits at 4
    out = run_trial_with_oom_retries(cfg)
    assert out["status"] == "ok"
    c = MlflowClient(store["uri"])
    runs = sorted(c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id]),
                  key=lambda r: r.info.start_time)
    assert [r.data.tags[record.STATUS] for r in runs] == ["oom", "ok"]
    first, retry = runs
    assert (int(first.data.params["batch_size"]), int(first.data.params["grad_accum"])) == (8, 1)
    assert (int(retry.data.params["batch_size"]), int(retry.data.params["grad_accum"])) == (4, 2)
    assert retry.data.tags[record.OOM_RETRY] == "1"
    assert first.data.tags[record.TRIAL_KEY] == retry.data.tags[record.TRIAL_KEY]


def test_oom_at_every_size_gives_up_and_propagates(tiny_bert, store):
    from trainers.trial import run_trial_with_oom_retries

    cfg = _cfg(tiny_bert, store)
    cfg.train.inject_fault, cfg.train.oom_retries = "oom@0", 2
    with pytest.raises(torch.OutOfMemoryError):
        run_trial_with_oom_retries(cfg)
    c = MlflowClient(store["uri"])
    runs = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    assert sorted(int(r.data.params["batch_size"]) for r in runs) == [2, 4, 8]
    assert all(r.data.tags[record.STATUS] == "oom" for r in runs)


def test_flops_are_counted_lora_aware(tiny_bert, store):
    """Same data, same batches: full FT pays 6 FLOPs per matmul weight and token, LoRA 4 per frozen weight
    and 6 per trained one. Tiny BERT's matmul weights: 2 x (4·32·32 + 2·32·64) + pooler 32·32 + head 32·2
    = 17,472; LoRA r=4 on q,v adds 2 x 2 x 2·4·32 = 1,024 and trains a copy of the head (64), whose
    frozen original stays counted: 6·17,472 - (4·17,472 + 6·1,088) = 28,416."""
    full = run_trial(_cfg(tiny_bert, store, name="full"))
    lora = run_trial(_cfg(tiny_bert, store, r=4, alpha=8, target_modules="attention_qv"))
    assert full[record.FLOPS_PER_TOKEN] - lora[record.FLOPS_PER_TOKEN] == pytest.approx(28_416)
    for out in (full, lora):
        assert out[record.TRAIN_TFLOPS_PER_S] == pytest.approx(out[record.TOKENS_PER_S] * out[record.FLOPS_PER_TOKEN] / 1e12)
        assert record.MFU not in out  # no agreed CPU peak: left out, not guessed
    run = MlflowClient(store["uri"]).get_run(lora["mlflow_run_id"])
    assert run.data.metrics[record.FLOPS_PER_TOKEN] == pytest.approx(lora[record.FLOPS_PER_TOKEN])
    assert run.data.params["precision"] == "auto" and run.data.params["gradient_checkpointing"] == "False"


def test_gradient_checkpointing_recomputes_and_changes_no_result(tiny_bert, store, monkeypatch):
    import transformers.modeling_utils as ckpt  # where transformers takes torch's checkpoint from

    calls = []
    real = ckpt.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    plain = run_trial(_cfg(tiny_bert, store, r=4, alpha=8, dropout=0.1))
    assert not calls
    monkeypatch.setattr(ckpt, "checkpoint", counting)  # a spy: the real function still runs
    cfg = _cfg(tiny_bert, store, r=4, alpha=8, dropout=0.1)
    cfg.train.gradient_checkpointing = True
    checkpointed = run_trial(cfg)
    assert len(calls) >= 2 * 4  # every layer, every step
    # recomputation replays the same dropout masks: the same training, bit for bit up to float noise
    assert checkpointed[record.TRAIN_LOSS] == pytest.approx(plain[record.TRAIN_LOSS], rel=1e-5)
    assert checkpointed["test_accuracy"] == plain["test_accuracy"]
