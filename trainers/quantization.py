"""Quantized base weights through bitsandbytes: a sibling of the method, chosen by `quant.mode`.

The method (LoRA, DoRA, ...) never branches on the backend: this module builds the load-time config,
patches the layers after load, and says up front whether the mode can run on the chosen device.
"""
from __future__ import annotations

import torch

from trainers.config import QuantConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Heads stay full precision: they are trained whole, and a quantized new head cannot learn.
HEAD_MODULES = ["classifier", "score", "pre_classifier", "lm_head"]


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def support_error(quant: QuantConfig, device: str) -> str | None:
    """Why `quant` cannot run on `device`, or None. Checked before any trial starts."""
    if quant.mode == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the mode is unavailable
        return f"quant.mode={quant.mode} needs bitsandbytes, which failed to import: {exc}"
    if device == "cpu" and quant.compute_dtype == "float16":
        return f"quant.mode={quant.mode} with compute_dtype=float16 is not supported on CPU; use float32"
    if device == "cuda" and not torch.cuda.is_available():
        return f"quant.mode={quant.mode} was asked on CUDA but no CUDA device is visible"
    return None


def bnb_config(quant: QuantConfig):
    if quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,  # nf4 fits normally-distributed weights better than fp4
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[quant.compute_dtype],
        llm_int8_skip_modules=HEAD_MODULES,
    )


def prepare_for_training(model, quant: QuantConfig):
    """Freeze the quantized base and make its inputs carry gradients to the adapters."""
    if quant.mode == "none":
        return model
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing trades ~30 % step time for activation memory; off by default here.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def patch_cpu_layers(model) -> int:
    """bitsandbytes 0.50.2 on CPU: the avx512-bf16 fast path of Linear4bit, taken after the first
    inference-mode pass, returns outputs detached from the graph, so every LoRA gradient becomes None
    from then on without any error (tests/test_methods_quant.py shows it). Returns how many layers were patched."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            patched += 1
    return patched
