"""The memory estimator's accounting, term by term (bench/memory_estimate.py checks it against measured peaks)."""
import pytest

from trainers.estimate import (ACT_BYTES_CUDA, ADAMW_BYTES, BYTES_PER_FROZEN, GB, LOGIT_BYTES, RUNTIME_CPU_GB,
                               estimate, predict_trial)

SHAPE = dict(hidden=2048, layers=16, heads=32, batch=4, seq=1024)


def test_weights_by_storage_dtype_and_trainable_state_in_fp32():
    n, t = 1_000_000_000, 10_000_000
    for quant, frozen_bytes in (("none", 4.0), ("none", 2.0), ("int8", 1.0), ("nf4", 0.5625)):
        e = estimate(t, n, **SHAPE, quant=quant, adapter=True, device="cuda", frozen_bytes=frozen_bytes)
        assert e.weights_gb == pytest.approx(((n - t) * frozen_bytes + t * 4) / GB)
        assert e.gradients_gb == pytest.approx(t * 4 / GB) and e.optimizer_gb == pytest.approx(t * ADAMW_BYTES / GB)
    assert BYTES_PER_FROZEN["nf4"] == BYTES_PER_FROZEN["fp4"] == 0.5625  # 4 bits + an fp32 scale per 64


def test_full_ft_peaks_in_the_optimizer_step_lora_in_backward():
    """Activations are gone before AdamW allocates its state: the peak is weights + gradients + the larger
    of the two, not their sum."""
    n = 1_000_000_000
    full = estimate(n, n, **SHAPE, quant="none", adapter=False, device="cuda")
    assert full.optimizer_gb > full.activations_gb
    assert full.total_gb == pytest.approx((4 + 4 + ADAMW_BYTES) * n / GB)
    lora = estimate(10_000_000, n, **SHAPE, quant="none", adapter=True, device="cuda", frozen_bytes=2)
    assert lora.total_gb == pytest.approx(lora.weights_gb + lora.gradients_gb + lora.activations_gb)


def test_a_quantized_base_on_cpu_is_loaded_in_fp32_first():
    kw = dict(**SHAPE, adapter=True, frozen_bytes=4.0)
    assert estimate(0, 1_000, quant="nf4", device="cpu", **kw).weights_gb == pytest.approx(1_000 * 4.5625 / GB)
    assert estimate(0, 1_000, quant="nf4", device="cuda", **kw).weights_gb == pytest.approx(1_000 * 0.5625 / GB)


def test_lora_inputs_and_dora_weights_add_activation_memory():
    base = estimate(0, 0, **SHAPE, quant="none", adapter=True, device="cuda")
    lora = estimate(0, 0, **SHAPE, quant="none", adapter=True, device="cuda", adapted_inputs=10_000)
    dora = estimate(0, 0, **SHAPE, quant="none", adapter=True, device="cuda", adapted_inputs=10_000,
                    dora_weights=10 ** 8)
    assert lora.activations_gb > base.activations_gb and dora.activations_gb > lora.activations_gb


def test_cuda_activations_follow_the_16_bit_accounting_and_fused_attention_is_linear_in_seq():
    e = estimate(0, 0, **SHAPE, quant="none", adapter=False, device="cuda")
    b, s, h, layers = SHAPE["batch"], SHAPE["seq"], SHAPE["hidden"], SHAPE["layers"]
    assert e.activations_gb == pytest.approx(b * s * h * layers * ACT_BYTES_CUDA / GB)
    longer = estimate(0, 0, **{**SHAPE, "seq": 2048}, quant="none", adapter=False, device="cuda")
    assert longer.activations_gb == pytest.approx(2 * e.activations_gb)
    eager = estimate(0, 0, **SHAPE, quant="none", adapter=False, device="cuda", fused_attention=False)
    assert eager.activations_gb - e.activations_gb == pytest.approx(5 * b * SHAPE["heads"] * s * s * layers / GB)
    assert e.runtime_gb == 0 and estimate(0, 0, **SHAPE, quant="none", adapter=False, device="cpu").runtime_gb \
        == RUNTIME_CPU_GB


def test_causal_lm_logits_and_checkpointing():
    plain = estimate(0, 0, **SHAPE, quant="none", adapter=True, device="cuda")
    lm = estimate(0, 0, **SHAPE, quant="none", adapter=True, device="cuda", vocab=128_256)
    assert lm.activations_gb - plain.activations_gb == pytest.approx(4 * 1024 * 128_256 * LOGIT_BYTES["cuda"] / GB)
    ckpt = estimate(0, 0, **SHAPE, quant="none", adapter=True, device="cuda", checkpointing=True)
    assert ckpt.activations_gb < plain.activations_gb / 4


def test_a_planned_trial_on_cuda_stores_a_frozen_base_in_bf16(tiny_llama):
    from sweeps.config import load

    cfg = load(["task=rotten_tomatoes_sft", f"model.path={tiny_llama}", "train.device=cuda"]).trial
    lora = predict_trial(cfg, validate_device=False)
    assert lora["estimate"].weights_gb == pytest.approx(
        ((lora["total"] - lora["trainable"]) * 2 + lora["trainable"] * 4) / GB)
    cfg.method.name = "full"
    full = predict_trial(cfg, validate_device=False)
    assert full["trainable"] == full["total"] and full["predicted_gb"] > lora["predicted_gb"]


def test_lora_dropout_copies_count_only_with_dropout(tiny_llama):
    from sweeps.config import load

    cfg = load(["task=rotten_tomatoes_sft", f"model.path={tiny_llama}", "method.target_modules=all_linear"]).trial
    with_dropout = predict_trial(cfg)["estimate"].activations_gb
    cfg.method.dropout = 0.0
    assert predict_trial(cfg)["estimate"].activations_gb < with_dropout
