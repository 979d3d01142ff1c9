"""Predict a trial's peak memory before it runs, from the model's shape alone (meta device, no weights).

peak ≈ runtime + weights + gradients + optimizer state + activations
  weights:     frozen params × bytes of their storage dtype (fp32 4, int8 1, nf4/fp4 0.5 + scales)
               + trainable params × 4 (adapters and full-FT weights train in fp32)
  gradients:   trainable × 4;  AdamW state: trainable × 8 (two fp32 moments)
  activations: batch × seq × layers × hidden × ACT_FACTOR × 4 bytes, plus attention scores
               batch × heads × seq² × layers × 4 × 2 (softmax in and out)
  runtime:     on CPU the process baseline (Python, torch, transformers, peft, datasets imported; measured
               RUNTIME_CPU_GB on these machines); on CUDA the context (~0.5 GB, outside the allocator).
Calibrated against measured peaks by bench/memory_estimate.py; the constants below are its fit.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1024 ** 3
BYTES_PER_FROZEN = {"none": 4.0, "int8": 1.0, "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64}
ACT_FACTOR = 34  # saved tensors per token per layer, in units of hidden (q,k,v,o, MLP 4h in/out, norms)
ACT_FACTOR_LORA = 6  # adapters add dropout copies and low-rank inputs on the adapted layers
RUNTIME_CPU_GB = 0.95  # RSS of a trial process before the model is loaded (2026-11, torch 2.13 CPU)
RUNTIME_CUDA_GB = 0.0  # max_memory_allocated excludes the CUDA context


@dataclass
class MemoryEstimate:
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    runtime_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.gradients_gb + self.optimizer_gb + self.activations_gb + self.runtime_gb


def estimate(trainable: int, total: int, hidden: int, layers: int, heads: int, batch: int, seq: int,
             quant: str, adapter: bool, device: str) -> MemoryEstimate:
    frozen = total - trainable
    weights = frozen * BYTES_PER_FROZEN[quant] + trainable * 4
    grads = trainable * 4
    optim = trainable * 8
    factor = ACT_FACTOR + (ACT_FACTOR_LORA if adapter else 0)
    acts = batch * seq * layers * hidden * factor * 4 + batch * heads * seq * seq * layers * 4 * 2
    runtime = RUNTIME_CUDA_GB if device.startswith("cuda") else RUNTIME_CPU_GB
    return MemoryEstimate(weights / GB, grads / GB, optim / GB, acts / GB, runtime)


def shape_of(config) -> tuple[int, int, int]:
    """(hidden, layers, heads) from an HF config, whatever the family calls them."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model")
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return int(hidden), int(layers), int(heads)


def predict_trial(cfg, validate_device: bool = True) -> dict:
    """Plan row for one trial: resolved modules, trainable/total params as peft counts them (on a meta-device
    copy: no weights), and the predicted peak memory on the device it would run on."""
    import copy

    from trainers.methods import apply_method, parameter_counts
    from trainers.modules import resolve_target_modules
    from trainers.trial import pick_device
    from trainers.validate import _meta

    device = pick_device(cfg.train.device) if validate_device else cfg.train.device
    model = copy.deepcopy(_meta(cfg))
    targets = resolve_target_modules(model, cfg.method.target_modules) if cfg.method.is_adapter else []
    model = apply_method(model, cfg.method, targets, cfg.task.type)
    trainable, total = parameter_counts(model)
    hidden, layers, heads = shape_of(model.config if hasattr(model, "config") else model.base_model.config)
    est = estimate(trainable, total, hidden, layers, heads, cfg.train.batch_size, cfg.task.max_length,
                   cfg.quant.mode, cfg.method.is_adapter, device)
    return {"targets": len(targets), "trainable": trainable, "total": total, "predicted_gb": est.total_gb,
            "estimate": est, "device": device}
