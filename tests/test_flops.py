"""trainers/flops.py on tiny random Llama models, plus a CPU smoke run of bench/gpu_table.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainers.flops import (  # noqa: E402
    matmul_param_counts,
    mfu,
    peak_flops_for_device,
    transformer_flops_per_token,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def linear_weight_sum(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def test_full_model_counts_linear_weights_and_not_the_embedding_lookup():
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2 / Llama-3.2
    frozen, trainable = matmul_param_counts(model)
    assert frozen == 0
    assert trainable == linear_weight_sum(model)
    # The vocabulary table is counted once, as the lm_head matmul. It is not counted a second time for
    # the lookup, and norm weights are not counted at all.
    embed = model.model.embed_tokens.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert trainable == sum(p.numel() for p in model.parameters()) - norms
    assert matmul_param_counts(model, include_tied_lm_head=False) == (0, trainable - embed)


def test_frozen_weights_are_counted_as_frozen():
    model = tiny_model()
    model.requires_grad_(False)
    assert matmul_param_counts(model) == (linear_weight_sum(model), 0)


def test_lora_counts_match_peft():
    from peft import LoraConfig, get_peft_model
    base = tiny_model()
    base_linear = linear_weight_sum(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    frozen, trainable = matmul_param_counts(model)
    assert frozen == base_linear
    assert trainable == model.get_nb_trainable_parameters()[0]
    # 2 layers x (q: 64->64, v: 64->32 under GQA), A: r x in, B: out x r
    assert trainable == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)


def test_lora_counts_exclude_non_matmul_trainables():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"],
                                                    task_type="CAUSAL_LM"))
    _, trainable = matmul_param_counts(model)
    # The trainable copies of the RMSNorms are elementwise and do no matmul.
    norms = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "norm" in n)
    assert norms >= TINY["hidden_size"]  # the final norm at least, so the subtraction below is exercised
    assert trainable == model.get_nb_trainable_parameters()[0] - norms
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_linears_count_logical_shape(kind, tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    ref = tiny_model()
    expected = linear_weight_sum(ref)
    ref.save_pretrained(tmp_path)
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
             if kind == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map={"": "cpu"})
    cls = bnb.nn.Linear4bit if kind == "4bit" else bnb.nn.Linear8bitLt
    qlinears = [m for m in model.modules() if isinstance(m, cls)]
    assert len(qlinears) == 2 * 7
    if kind == "4bit":  # the packed tensor really is smaller, so counting numel() would be wrong
        assert qlinears[0].weight.numel() < qlinears[0].in_features * qlinears[0].out_features
    frozen, trainable = matmul_param_counts(model)
    assert frozen + trainable == expected
    assert frozen == sum(m.in_features * m.out_features for m in qlinears)


def test_lora_flops_save_exactly_the_frozen_weight_gradients():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model(), LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    frozen, trainable = matmul_param_counts(model)
    args = (frozen, trainable, TINY["num_hidden_layers"], 128, TINY["hidden_size"])
    lora = transformer_flops_per_token(*args, full_finetune=False)
    full = transformer_flops_per_token(*args, full_finetune=True)
    assert lora < full
    assert full - lora == pytest.approx(2 * frozen)
    attention = 12 * TINY["num_hidden_layers"] * 128 * TINY["hidden_size"]
    assert lora == pytest.approx(4 * frozen + 6 * trainable + attention)


def test_attention_term_scales_with_seq_len_and_counts_fwd_plus_bwd():
    assert transformer_flops_per_token(0, 0, 30, 512, 576, full_finetune=True) == 3 * 2 * 2 * 30 * 512 * 576
    assert transformer_flops_per_token(0, 0, 30, 1024, 576, full_finetune=False) == 2 * transformer_flops_per_token(
        0, 0, 30, 512, 576, full_finetune=False)
    # Plain 6N for full FT with no attention (seq_len 0)
    assert transformer_flops_per_token(10, 90, 1, 0, 1, full_finetune=True) == 600


def test_mfu_arithmetic():
    assert mfu(1_000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert mfu(0.0, 6e9, 1e13) == 0.0
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


@pytest.mark.parametrize("name,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 80GB HBM3", "torch.bfloat16", 989e12),
    ("NVIDIA H200", "fp16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
    ("NVIDIA A10G", "bf16", 125e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA GeForce RTX 4090", "bf16", 165e12),
    ("cpu AMD EPYC", "fp32", None),
    ("NVIDIA H100 80GB HBM3", "int4", None),
    ("NVIDIA Tesla T4", "fp16", None),
])
def test_peak_flops_table(name, dtype, expected):
    got = peak_flops_for_device(name, dtype)
    assert got == (None if expected is None else pytest.approx(expected))


def test_gpu_table_cpu_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_table.py"), "--device", "cpu", "--sizes", "tiny",
         "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "32", "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)  # cwd elsewhere: the bench finds the repo itself
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(tmp_path.glob("gpu_table-*.json"))
    assert len(files) == 1, proc.stdout
    res = json.loads(files[0].read_text())
    assert res["info"]["torch"] == torch.__version__ and "peft" in res["info"]
    arms = {a["arm"]: a for a in res["sizes"]["tiny"]["arms"]}
    assert set(arms) == {"full", "lora_attn", "lora_all", "qlora_nf4"}
    for name, arm in arms.items():
        if name == "qlora_nf4" and arm["status"].startswith("skipped"):
            continue
        assert arm["status"] == "ok", arm
        assert arm["tokens_per_s"] > 0 and arm["peak_rss_gib"] > 0
        assert arm["grads_present_all_steps"] is True
        assert "mem_ratio_vs_full" in arm and "tokens_per_s_ratio_vs_full" in arm
    assert arms["full"]["mem_ratio_vs_full"] == 1.0 and arms["full"]["tokens_per_s_ratio_vs_full"] == 1.0
    assert arms["lora_attn"]["trainable_params"] < arms["lora_all"]["trainable_params"] < arms["full"]["trainable_params"]
    assert arms["lora_all"]["flops_per_token"] < arms["full"]["flops_per_token"]
    assert "| lora_all | ok |" in proc.stdout and "tok/s × full" in proc.stdout
