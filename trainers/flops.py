"""Training FLOPs per token and model FLOPs utilisation (MFU), LoRA-aware.

The usual "6·N FLOPs per token" assumes that every weight gets a gradient. Under LoRA/QLoRA the base is
frozen, so its weight gradient (2·N of the 6·N) is never computed. The activation gradient through it is
still needed, because trainable adapters sit upstream of it. So a frozen matmul weight costs 4 FLOPs per
token (forward 2 + input-grad 2) and a trainable one costs 6. The count is approximate: the first frozen
layers, which have nothing trainable below them, really skip the input gradient too.

Imports nothing else from the project, so sweeps/, evaluation/ and bench/ can all use it.
"""
from __future__ import annotations

import re

import torch.nn as nn


def _is_linear_like(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt and peft's lora_A / lora_B are nn.Linear subclasses. peft's
    # LoRA wrapper is not, so its base_layer and adapters are each counted once, as separate Linears.
    # GPT-2-style Conv1D is a matmul whose weight is stored transposed.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matmul_size(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        # Linear4bit packs two 4-bit values per byte into a [n/2, 1] uint8 tensor, so numel() undercounts
        # by half. The matmul it performs (after dequantising) is still out x in.
        return int(module.in_features) * int(module.out_features)
    return int(module.weight.numel())


def matmul_param_counts(model: nn.Module, include_tied_lm_head: bool = True) -> tuple[int, int]:
    """(frozen, trainable): how many parameters the model multiplies per token, split by requires_grad.

    Embedding tables are left out because a lookup reads one row and does no multiply-adds, so counting
    V·d of them would overstate the work by about a fifth on a large-vocabulary model like Llama-3.2-1B.
    A tied lm_head shares that table but *is* a full d x V matmul for every token. It is counted by default
    (PaLM's 6N accounting does the same, counting the shared table once). Pass include_tied_lm_head=False
    to leave it out. Biases are skipped: they are adds, not matmuls.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    frozen = trainable = 0
    for module in model.modules():
        if not _is_linear_like(module) or getattr(module, "weight", None) is None:
            continue
        if not include_tied_lm_head and id(module.weight) in embedding_weights:
            continue
        n = _matmul_size(module)
        if module.weight.requires_grad:
            trainable += n
        else:
            frozen += n
    return frozen, trainable


def transformer_flops_per_token(
    n_frozen_params: int,
    n_trainable_params: int,
    n_layers: int,
    seq_len: int,
    hidden_size: int,
    full_finetune: bool,
) -> float:
    """Training FLOPs (forward + backward) per token for a decoder/encoder transformer.

    Parameter counts are matmul parameters (see matmul_param_counts). Full fine-tuning is charged 6 per
    parameter even if the caller passes some as frozen, because that arm's definition is "all weights train".
    """
    if full_finetune:
        param_flops = 6.0 * (n_frozen_params + n_trainable_params)
    else:
        param_flops = 4.0 * n_frozen_params + 6.0 * n_trainable_params
    # Per layer and token, QK^T and AV each cost 2·seq·hidden in the forward pass. The backward pass needs the
    # activation gradients of both whether or not any weight trains, so it is x3 for every arm. This is
    # the non-causal count (PaLM's 12·L·s·d convention), so MFU figures compare with published ones.
    attention_flops = 3.0 * 2.0 * 2.0 * n_layers * seq_len * hidden_size
    return param_flops + attention_flops


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction (not %) of the device's peak."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops


# Dense (no 2:4 sparsity) tensor-core peaks from the vendor datasheets. Sparse figures are 2x and would
# halve every MFU. "tf32" is what torch reaches with allow_tf32. "fp32" is plain CUDA-core FP32, which is
# torch's default for fp32 matmuls. Order matters: more specific names come first (H100 PCIe/NVL before
# the H100 SXM default, A100 before A10).
_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"h100.*pcie", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    (r"h100.*nvl", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    (r"h200.*nvl", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    # H100 SXM reports itself as e.g. "NVIDIA H100 80GB HBM3". H200 has the same compute, with more and
    # faster memory.
    (r"h100|h200|gh200", {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67}),
    (r"a100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    (r"\bl4\b", {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3}),
    # A10 datasheet figure. AWS does not publish A10G tensor peaks, and some sources quote lower ones, so
    # A10G MFU may read low.
    (r"\ba10g?\b", {"bf16": 125, "fp16": 125, "tf32": 62.5, "fp32": 31.2}),
    # GeForce Ada with FP32 accumulation, which is what torch uses. The 330 TFLOP/s figure needs FP16
    # accumulation.
    (r"rtx 4090", {"bf16": 165, "fp16": 165, "tf32": 82.6, "fp32": 82.6}),
]
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def peak_flops_for_device(name: str, dtype: str) -> float | None:
    """Peak dense FLOP/s for a device name as torch.cuda.get_device_name() reports it.

    Returns None when the device or dtype is unknown (e.g. any CPU). In that case MFU should be left
    blank rather than guessed.
    """
    key = _DTYPE_ALIASES.get(dtype.lower().removeprefix("torch."), dtype.lower().removeprefix("torch."))
    lowered = name.lower()
    for pattern, peaks in _PEAK_TFLOPS:
        if re.search(pattern, lowered):
            tflops = peaks.get(key)
            return None if tflops is None else tflops * 1e12
    return None
