"""Load what a trial saved (an adapter onto its exact base model, or a full-FT model) for promotion, the
reload check and serving; score it with trainers/scoring.py, the same path the trial evaluated with."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from trainers import quantization, record
from trainers.assets import base_model_reference
from trainers.config import ConfigError, QuantConfig, TrialConfig, load_trial_config
from trainers.device import pick_device
from trainers.model import load_model, load_tokenizer

BASE_MODEL_FILE = "base_model.json"  # written beside a promoted adapter: the base it needs, hashed


def write_base_reference(weights_dir: str) -> dict:
    """Record the exact base model of the adapter in `weights_dir` (see assets.base_model_reference)."""
    cfg = load_trial_config(str(Path(weights_dir) / record.TRIAL_CONFIG_FILE))
    ref = base_model_reference(cfg.model)
    (Path(weights_dir) / BASE_MODEL_FILE).write_text(json.dumps(ref, indent=1))
    return ref


def check_base_reference(weights_dir: str, cfg: TrialConfig) -> None:
    """Refuse to put an adapter on a base whose weights differ from the one it was trained on: it would
    load without error and predict nonsense (mlflow#22020: a silently random base)."""
    path = Path(weights_dir) / BASE_MODEL_FILE
    if not path.exists():
        return
    expected = json.loads(path.read_text())
    found = base_model_reference(cfg.model)
    for key in ("sha256", "revision"):
        if expected.get(key) and found.get(key) and expected[key] != found[key]:
            raise ConfigError(f"base model {cfg.model.path!r} has {key} {found[key][:16]}…, but the adapter was "
                              f"trained on {expected[key][:16]}…: refusing to load it onto a different base")


def load_trained(weights_dir: str, device: str = "auto", base_quant: str | None = None, merge: bool = False):
    """(model, tokenizer, trial config) from a saved adapter (or full-FT model) folder.
    `base_quant` loads the base another way than it was trained (e.g. "none": full precision, to measure
    merge damage of a QLoRA adapter); `merge` folds the adapter into the base weights."""
    cfg = load_trial_config(str(Path(weights_dir) / record.TRIAL_CONFIG_FILE))
    if base_quant is not None:
        cfg = dataclasses.replace(cfg, quant=QuantConfig(mode=base_quant, compute_dtype=cfg.quant.compute_dtype))
    check_base_reference(weights_dir, cfg)
    device = pick_device(device)
    tokenizer = load_tokenizer(cfg)
    if cfg.method.is_adapter:
        from peft import PeftModel

        base = load_model(cfg, len(cfg.task.labels), tokenizer, device)
        model = PeftModel.from_pretrained(base, weights_dir)
        if merge:
            model = model.merge_and_unload()
        if device == "cpu":  # the trial scored through the same layers (bitsandbytes' CPU fast path is off)
            quantization.patch_cpu_layers(model)
    else:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if cfg.task.type == "classification" else AutoModelForCausalLM
        model = cls.from_pretrained(weights_dir).to(device)
    model.eval()
    return model, tokenizer, cfg
