"""Public API for code outside the trainer (promotion, serving): load trained weights onto their base
model and score a split exactly as the trial did."""
from __future__ import annotations

from pathlib import Path

from trainers import data, record
from trainers.config import TrialConfig, load_trial_config
from trainers.model import load_model, load_tokenizer
from trainers.trial import _evaluate, pick_device


def load_trained(weights_dir: str, device: str = "auto"):
    """(model, tokenizer, trial config) from a saved adapter (or full-FT model) folder."""
    cfg = load_trial_config(str(Path(weights_dir) / record.TRIAL_CONFIG_FILE))
    device = pick_device(device)
    tokenizer = load_tokenizer(cfg)
    if cfg.method.is_adapter:
        from peft import PeftModel

        base = load_model(cfg, len(cfg.task.labels), tokenizer, device)
        model = PeftModel.from_pretrained(base, weights_dir)
    else:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if cfg.task.type == "classification" else AutoModelForCausalLM
        model = cls.from_pretrained(weights_dir).to(device)
    model.eval()
    return model, tokenizer, cfg


def score_split(model, tokenizer, cfg: TrialConfig, split: str = "test", device: str = "auto") -> dict:
    """Task metrics of `split` (`test_accuracy`, ...), from the same deterministic partition."""
    frame = data.load_splits(cfg.task)[split]
    if cfg.task.type == "classification":
        encoded = data.tokenize_classification(frame, tokenizer, cfg.task.max_length)
    else:
        encoded = data.tokenize_sft(frame, tokenizer, cfg.task)
    return _evaluate(model, cfg, encoded, tokenizer, pick_device(device), split)


def predict_texts(model, tokenizer, cfg: TrialConfig, texts: list[str], device: str = "auto") -> list[str]:
    """Label names for raw texts (classification tasks)."""
    import torch

    device = pick_device(device)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            batch = tokenizer(texts[i:i + 64], truncation=True, max_length=cfg.task.max_length,
                              padding=True, return_tensors="pt").to(device)
            out += [cfg.task.labels[j] for j in model(**batch).logits.argmax(-1).tolist()]
    return out
