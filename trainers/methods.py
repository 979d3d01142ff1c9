"""Parameter-efficient methods (and full fine-tuning) as one choice among peers."""
from __future__ import annotations

from trainers.config import MethodConfig
from trainers.modules import _role


def apply_method(model, method: MethodConfig, target_names: list[str], task_type: str):
    """Wrap `model` for training with `method`; `target_names` are full module names (see modules.py)."""
    if method.name in ("full", "base"):
        for param in model.parameters():
            param.requires_grad_(method.name == "full")  # base: scored as it is, nothing trains
        return model

    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    peft_task = TaskType.SEQ_CLS if task_type == "classification" else TaskType.CAUSAL_LM
    if method.name == "ia3":
        config = IA3Config(
            task_type=peft_task, target_modules=target_names,
            # IA3 scales the input of feed-forward layers and the output of the others.
            feedforward_modules=[n for n in target_names if _role(n) == "mlp"])
    else:
        config = LoraConfig(
            task_type=peft_task, r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
            target_modules=target_names,
            use_rslora=method.name == "rslora",  # scale alpha/sqrt(r): keeps high ranks learning
            use_dora=method.name == "dora",  # magnitude/direction split: ~+20-40 % step time
            init_lora_weights=method.init_lora_weights)
    return get_peft_model(model, config)


def upcast_trainable(model) -> int:
    """Trainable weights in float32 whatever the base is stored in: AdamW updates of ~1e-4 vanish in bf16.
    Autocast runs the matmuls in the low precision either way. Returns how many tensors were cast."""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) as peft counts them (packed 4-bit weights counted at full size)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return tuple(int(x) for x in model.get_nb_trainable_parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
