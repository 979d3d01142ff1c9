"""Predict a trial's peak memory before it runs, from the model's shape alone (meta device, no weights).

peak ≈ runtime + weights + max(activations + gradients, gradients + optimizer state)
  — activations are freed by the end of backward, before AdamW allocates its state at the first step, so
  the two never peak together (full FT on SmolLM2 peaks in the optimizer step, LoRA in backward).
  weights:     frozen params × bytes of their storage dtype (fp32 4, bf16 2, int8 1, nf4/fp4 0.5 + scales)
               + trainable params × 4 (adapters, heads and full-FT weights train in fp32). On CPU a quantized
               base is first loaded in fp32 and quantized after, so the fp32 copy is in the peak too.
  gradients:   trainable × 4;  AdamW: trainable × (8 state + 4 for the foreach kernels' temporaries)
  activations: per token, layer and hidden unit, ACT_BYTES_CPU (fp32, fitted) or ACT_BYTES_CUDA (Korthikanti
               et al.'s 34 bytes for 16-bit activations); SDPA keeps no seq² score matrix (eager attention
               keeps 5 bytes × heads × seq²); causal LMs add batch × seq × vocab logits with their fp32
               upcast and gradient; each LoRA-adapted layer keeps its dropped-out input; DoRA also
               materialises W + BA for the weight norm of every adapted layer.
  workers:     per worker of N (trainers/distributed.py): each computes batch / N rows, so activations / N;
               DDP keeps a full replica plus its gradient buckets (another gradients' worth); FSDP full shard
               divides weights, gradients and AdamW states by N and adds the one block it gathers at a time.
  runtime:     on CPU the process baseline (Python, torch, transformers, peft, datasets, tokenizer, data);
               on CUDA 0: max_memory_allocated excludes the context (~0.5 GB, added by sweeps/packing.py).
The CPU constants are fitted by bench/memory_estimate.py against measured peak RSS of the shipped sweeps
(MiniLM on Rotten Tomatoes, SmolLM2-135M methods x quantization); the CUDA branch follows the published
accounting and is still to be checked against measured VRAM on a GPU (same bench).
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.config import LORA_FAMILY

GB = 1024 ** 3
BYTES_PER_FROZEN = {"int8": 1.0, "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64}  # + one fp32 scale per 64-block
ADAMW_BYTES = 8 + 4  # two fp32 moments + the foreach kernels' temporaries
ACT_BYTES_CPU = 77  # fitted on 36 trials (2026-11-25): fp32 activations saved per token, layer, hidden unit
ACT_BYTES_CUDA = 34  # 16-bit activations (Korthikanti et al. 2022), per token, layer, hidden unit
LORA_INPUT_BYTES = {"cpu": 10, "cuda": 4}  # per token and adapted input feature: dropout output (+ mask)
DORA_WEIGHT_BYTES = {"cpu": 8, "cuda": 4}  # per adapted weight: W + BA for the norm, and its gradient path
LOGIT_BYTES = {"cpu": 12, "cuda": 10}  # per token and vocabulary entry: logits, fp32 upcast, gradient
RUNTIME_CPU_GB = 1.11  # fitted: RSS of a trial process before weights and activations (torch 2.13 CPU),
# when the trial wrote its own MLflow run; it now holds ~0.12 GB less and its writer process ~0.21 GB
# (trainers/trial_run.py), so the constant still covers what one trial costs a machine
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
        return self.runtime_gb + self.weights_gb + self.gradients_gb + max(self.activations_gb, self.optimizer_gb)


def estimate(trainable: int, total: int, hidden: int, layers: int, heads: int, batch: int, seq: int,
             quant: str, adapter: bool, device: str, frozen_bytes: float = 4.0, vocab: int = 0,
             fused_attention: bool = True, checkpointing: bool = False, adapted_inputs: int = 0,
             dora_weights: int = 0, training: bool = True, workers: int = 1,
             strategy: str = "single") -> MemoryEstimate:
    """`frozen_bytes`: storage of an unquantized frozen weight (4 fp32, 2 bf16); `vocab` > 0 for a causal LM
    (logits); `fused_attention`: SDPA/flash, no seq² matrix kept; `checkpointing`: only each layer's input is
    kept, one layer's activations at a time; `adapted_inputs`: summed input features of LoRA-adapted layers;
    `dora_weights`: summed weight sizes of DoRA-adapted layers; `training=False` (the base arm): only scored,
    so nothing is kept for backward but the generation's key/value cache."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    frozen = total - trainable
    per_frozen = BYTES_PER_FROZEN.get(quant, frozen_bytes)
    if kind == "cpu" and quant in BYTES_PER_FROZEN:
        per_frozen += 4.0  # loaded in fp32, then quantized: both copies count in the process's peak
    weights = frozen * per_frozen + trainable * 4
    tokens = batch * seq
    per_layer = ACT_BYTES_CUDA if kind == "cuda" else ACT_BYTES_CPU
    kept_layers = 1 if checkpointing else layers
    acts = tokens * kept_layers * hidden * per_layer
    if checkpointing:
        acts += tokens * hidden * layers * (2 if kind == "cuda" else 4)  # each layer's saved input
    if not fused_attention:
        acts += 5 * batch * heads * seq * seq * kept_layers * (1 if kind == "cuda" else 2)
    acts += tokens * vocab * LOGIT_BYTES[kind]
    # DoRA on a quantized base also dequantizes each adapted weight to take its norm
    dora_bytes = DORA_WEIGHT_BYTES[kind] + (4 if quant in BYTES_PER_FROZEN else 0)
    acts += tokens * adapted_inputs * LORA_INPUT_BYTES[kind] + dora_weights * dora_bytes
    if not training:
        acts = 2 * tokens * layers * hidden * (4 if kind == "cpu" else 2)  # keys and values, every layer
    grads, optim = trainable * 4, trainable * ADAMW_BYTES
    if workers > 1:
        acts /= workers
        if strategy == "fsdp":
            weights = weights / workers + weights / max(1, layers)  # a shard, plus the block being gathered
            grads, optim = grads / workers, optim / workers
        else:
            grads *= 2  # DDP's gradient buckets beside the gradients
    return MemoryEstimate(weights_gb=weights / GB, gradients_gb=grads / GB, optimizer_gb=optim / GB,
                          activations_gb=acts / GB, runtime_gb=RUNTIME_CUDA_GB if kind == "cuda" else RUNTIME_CPU_GB)


def sequence_length(cfg) -> int:
    """Tokens per sequence at most: the truncated text; plus the label tokens for causal_lm_sft (a few);
    for sft the prompt (cut to max_length) plus what generation appends."""
    extra = {"classification": 0, "causal_lm_sft": 8, "sft": cfg.task.max_new_tokens}
    return cfg.task.max_length + extra[cfg.task.type]


def predict_trial(cfg, validate_device: bool = True, workers: int | None = None) -> dict:
    """Plan row for one trial: resolved modules, trainable/total params as peft counts them (on a meta-device
    copy: no weights), and the predicted peak memory of one worker on the device it would run on.
    `workers`: instead of train.workers (the plan tries counts for train.workers=auto)."""
    from trainers.distributed import choose_strategy

    import torch

    from trainers.device import pick_device
    from trainers.methods import parameter_counts
    from trainers.model import base_dtype, cached_meta_model, shape_of

    device = pick_device(cfg.train.device) if validate_device else cfg.train.device
    n = workers or (cfg.train.workers if isinstance(cfg.train.workers, int) else 1)
    strategy = choose_strategy(cfg.train.strategy, not cfg.method.is_adapter) if n > 1 else "single"
    model, targets, config = _wrapped_meta(cfg)
    trainable, total = parameter_counts(model)
    hidden, layers, heads = shape_of(config)
    attention = cfg.model.attn_implementation or "sdpa"
    modules = dict(cached_meta_model(cfg).named_modules())
    # with dropout, each adapted layer keeps its own dropped-out copy of its input (q, k and v: three copies
    # of one tensor); without, peft feeds the input itself and keeps only the rank-r output
    lora_family = cfg.method.name in LORA_FAMILY and cfg.method.dropout > 0
    est = estimate(trainable, total, hidden, layers, heads, cfg.train.batch_size, sequence_length(cfg),
                   cfg.quant.mode, cfg.method.is_adapter, device,
                   frozen_bytes=torch.finfo(base_dtype(cfg, device)).bits / 8,
                   vocab=getattr(config, "vocab_size", 0) if cfg.task.type != "classification" else 0,
                   fused_attention=attention != "eager", checkpointing=cfg.train.gradient_checkpointing,
                   adapted_inputs=sum(_in_features(modules[n]) for n in targets) if lora_family else 0,
                   dora_weights=sum(modules[n].weight.numel() for n in targets) if cfg.method.name == "dora" else 0,
                   training=cfg.method.trains, workers=n, strategy=strategy)
    return {"targets": len(targets), "trainable": trainable, "total": total, "predicted_gb": est.total_gb,
            "estimate": est, "device": device, "workers": n, "strategy": strategy}


def _wrapped_meta(cfg):
    """(the trial's model wrapped by its method, resolved target names, HF config), on the meta device."""
    import copy

    from trainers.methods import apply_method
    from trainers.model import cached_meta_model
    from trainers.modules import resolve_target_modules

    model = copy.deepcopy(cached_meta_model(cfg))
    targets = resolve_target_modules(model, cfg.method.target_modules) if cfg.method.is_adapter else []
    model = apply_method(model, cfg.method, targets, cfg.task.type)
    return model, targets, (model.config if hasattr(model, "config") else model.base_model.config)


def _in_features(module) -> int:
    """Input width of a linear-like layer (GPT-2's Conv1D stores its weight transposed)."""
    return int(getattr(module, "in_features", None) or module.weight.shape[0])


def predict_train_flops(cfg) -> float:
    """Training FLOPs of a trial before it runs (LoRA-aware, trainers/flops.py) — the sweep starts the most
    expensive trials first, so the last ones to finish are short (longest-processing-time-first)."""
    import math

    from trainers.flops import matmul_param_counts, transformer_flops_per_token
    from trainers.loop import total_steps
    from trainers.model import shape_of

    if not cfg.method.trains:
        return 0.0  # the base arm is only scored
    model, _, config = _wrapped_meta(cfg)
    frozen, trainable = matmul_param_counts(model)
    hidden, layers, _ = shape_of(config)
    seq = sequence_length(cfg)
    per_token = transformer_flops_per_token(frozen, trainable, layers, seq, hidden, cfg.method.name == "full")
    t = cfg.train
    rows = cfg.task.train_size or 10_000  # unknown without reading the data: equal for every arm anyway
    steps = total_steps(math.ceil(rows / t.batch_size), t)  # counted as the loop counts them
    return per_token * steps * t.batch_size * t.grad_accum * seq
