"""Dropout on the CPU at less than half the cost: a sibling of the method, like quantization, swapped in after the
model is wrapped (trainers/trial.py) and applied to every `nn.Dropout` it holds (the base's and the adapters').

PyTorch draws a CPU dropout mask with `bernoulli_`, one double-precision draw of its serial Mersenne Twister
per element: on MiniLM LoRA at batch 16 its 32 masks a step took a quarter of the step's wall time, during
which the other core waited. `CpuDropout` draws 64 random bits per four elements instead, and drops an element
when its 16 bits fall under p (p is kept to 1/65536: 0.05 becomes 0.0500031, and the survivors are scaled
by that exact rate, so activations keep their expectation). The draws come from the same seeded generator
(`torch.manual_seed`), so a seed still reproduces a run exactly; the masks are not `bernoulli_`'s, so a run
moves by what another seed would move it, and `train.fast_cpu_dropout=false` gives torch's masks back.
The gain is largest where a trial has several threads (bench/dropout.py measures both side by side).

Attention-probability dropout inside `scaled_dot_product_attention` is the kernel's own and is left alone.
"""
from __future__ import annotations

import torch

_LEVELS = 1 << 16  # a mask element's resolution: 16 random bits


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """(bool mask of the elements kept, the scale that keeps the expectation): each element is dropped with
    probability round(p * 65536) / 65536, independently."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64)
    words.random_(-(1 << 63), (1 << 63) - 1)  # the full 64 bits: four 16-bit draws, from torch's seeded generator
    cut = round(p * _LEVELS)
    keep = words.view(torch.int16)[:n].view(shape) >= cut - _LEVELS // 2
    return keep, _LEVELS / (_LEVELS - cut)


class CpuDropout(torch.nn.Dropout):
    """`nn.Dropout` with a cheaper mask on CPU tensors; anything else (CUDA, in-place, p outside (0, 1))
    goes to nn.Dropout's own kernel. Still an nn.Dropout, so code that checks for one (peft's) sees one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not x.is_cpu or self.inplace or not 0.0 < self.p < 1.0:
            return super().forward(x)
        keep, scale = keep_mask(x.shape, self.p)
        # the scale folded into a float mask, as nn.Dropout's: backward is then one multiply (multiplying by the
        # bool mask itself would convert it to float again in backward, ~30 % more time for the pair)
        return x * keep.to(x.dtype).mul_(scale)


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Swap every plain nn.Dropout of `model` for a CpuDropout of the same rate, in place; returns how many.
    A dropout holds no weights, so nothing saved or loaded changes."""
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is torch.nn.Dropout:
                swap = CpuDropout(child.p, child.inplace)
                swap.train(child.training)
                setattr(module, name, swap)
                swapped += 1
    return swapped
