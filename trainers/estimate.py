"""Predict a trial's peak memory before it runs, from the model's shape alone (meta device, no weights).

peak ≈ runtime + weights + gradients + optimizer state + activations (+ logits for causal LMs)
  weights:     frozen params × bytes of their storage dtype (fp32 4, bf16 2, int8 1, nf4/fp4 0.5 + scales)
               + trainable params × 4 (adapters, heads and full-FT weights train in fp32)
  gradients:   trainable × 4;  AdamW state: trainable × 8 (two fp32 moments)
  activations: CPU (fp32, eager attention): batch × seq × layers × hidden × ACT_FACTOR × 4 bytes plus the
               attention scores batch × heads × seq² × layers × 4 × 2 (softmax in and out).
               CUDA (autocast): Korthikanti et al.'s 34 bytes × batch × seq × hidden per layer for 16-bit
               activations; SDPA/flash attention keeps no seq² score matrix (eager keeps 5 bytes × heads × seq²).
  logits:      causal LMs keep batch × seq × vocab logits, their fp32 upcast for the loss and its gradient —
               with a 49k–128k vocabulary this is often the largest single tensor.
  runtime:     on CPU the process baseline (Python, torch, transformers, peft, datasets imported; measured
               RUNTIME_CPU_GB on these machines); on CUDA 0: max_memory_allocated excludes the context (~0.5 GB,
               added by sweeps/packing.py where GPUs are shared).
The CPU constants are fitted by bench/memory_estimate.py against measured peak RSS; the CUDA branch follows
the published accounting and is still to be checked against measured VRAM on a GPU (same bench).
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1024 ** 3
BYTES_PER_FROZEN = {"int8": 1.0, "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64}  # + one fp32 scale per 64-block
ACT_FACTOR = 34  # CPU: saved tensors per token per layer, in units of hidden (q,k,v,o, MLP 4h in/out, norms)
ACT_FACTOR_LORA = 6  # adapters add dropout copies and low-rank inputs on the adapted layers
ACT_BYTES_CUDA = 34  # bytes per token per layer per hidden unit at 16-bit (Korthikanti et al. 2022)
LOGIT_BYTES_CPU = 12  # fp32 logits, log-softmax, gradient
LOGIT_BYTES_CUDA = 10  # bf16 logits, fp32 upcast for the loss, its fp32 gradient
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
             quant: str, adapter: bool, device: str, frozen_bytes: float = 4.0, vocab: int = 0,
             fused_attention: bool = True, checkpointing: bool = False) -> MemoryEstimate:
    """`frozen_bytes`: storage of an unquantized frozen weight (4 fp32, 2 bf16); `vocab` > 0 for a causal LM
    (logits); `fused_attention`: SDPA/flash on CUDA, no seq² matrix kept; `checkpointing`: only each layer's
    input is kept, and one layer's activations exist at a time during its recompute."""
    if checkpointing:
        kept = estimate(trainable, total, hidden, 1, heads, batch, seq, quant, adapter, device, frozen_bytes,
                        vocab, fused_attention)
        inputs = batch * seq * hidden * layers * (2 if device.startswith("cuda") else 4) / GB
        return MemoryEstimate(kept.weights_gb, kept.gradients_gb, kept.optimizer_gb,
                              kept.activations_gb + inputs, kept.runtime_gb)
    frozen = total - trainable
    weights = frozen * BYTES_PER_FROZEN.get(quant, frozen_bytes) + trainable * 4
    grads = trainable * 4
    optim = trainable * 8
    lora = ACT_FACTOR_LORA if adapter else 0
    if device.startswith("cuda"):
        acts = batch * seq * layers * hidden * (ACT_BYTES_CUDA + 2 * lora)
        if not fused_attention:
            acts += 5 * batch * heads * seq * seq * layers
        acts += batch * seq * vocab * LOGIT_BYTES_CUDA
        runtime = RUNTIME_CUDA_GB
    else:
        acts = batch * seq * layers * hidden * (ACT_FACTOR + lora) * 4 + batch * heads * seq * seq * layers * 4 * 2
        acts += batch * seq * vocab * LOGIT_BYTES_CPU
        runtime = RUNTIME_CPU_GB
    return MemoryEstimate(weights / GB, grads / GB, optim / GB, acts / GB, runtime)


def shape_of(config) -> tuple[int, int, int]:
    """(hidden, layers, heads) from an HF config, whatever the family calls them."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model")
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return int(hidden), int(layers), int(heads)


def sequence_length(cfg) -> int:
    """Tokens per training example at most: the truncated text, plus the answer for SFT (prompt template
    words and label tokens, a few dozen at most)."""
    return cfg.task.max_length + (0 if cfg.task.type == "classification" else 8)


def predict_trial(cfg, validate_device: bool = True) -> dict:
    """Plan row for one trial: resolved modules, trainable/total params as peft counts them (on a meta-device
    copy: no weights), and the predicted peak memory on the device it would run on."""
    import copy

    import torch

    from trainers.methods import apply_method, parameter_counts
    from trainers.model import base_dtype
    from trainers.modules import resolve_target_modules
    from trainers.trial import pick_device
    from trainers.validate import _meta

    device = pick_device(cfg.train.device) if validate_device else cfg.train.device
    model = copy.deepcopy(_meta(cfg))
    targets = resolve_target_modules(model, cfg.method.target_modules) if cfg.method.is_adapter else []
    model = apply_method(model, cfg.method, targets, cfg.task.type)
    trainable, total = parameter_counts(model)
    config = model.config if hasattr(model, "config") else model.base_model.config
    hidden, layers, heads = shape_of(config)
    attention = cfg.model.attn_implementation or "sdpa"
    est = estimate(trainable, total, hidden, layers, heads, cfg.train.batch_size, sequence_length(cfg),
                   cfg.quant.mode, cfg.method.is_adapter, device,
                   frozen_bytes=torch.finfo(base_dtype(cfg, device)).bits / 8,
                   vocab=getattr(config, "vocab_size", 0) if cfg.task.type != "classification" else 0,
                   fused_attention=attention != "eager", checkpointing=cfg.train.gradient_checkpointing)
    return {"targets": len(targets), "trainable": trainable, "total": total, "predicted_gb": est.total_gb,
            "estimate": est, "device": device}
