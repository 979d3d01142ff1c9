"""Which device a trial runs on: one rule, read by the recipe, validation, the estimator and inference."""
from __future__ import annotations


def pick_device(requested: str) -> str:
    """`auto` is CUDA when a GPU is visible, else CPU; anything else is taken as given (checked by validation)."""
    if requested == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested
