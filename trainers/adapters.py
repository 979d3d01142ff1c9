"""Several promoted adapters of one base in one process, and an adapter folded into its base for export.

A set loads the base once and adds each adapter by name (PEFT `load_adapter`: a few MB each, against the
base's whole weight for a process per adapter). Rows of different adapters answer in one mixed batch: PEFT's
`adapter_names` makes every LoRA layer, and every trained task head (`modules_to_save`, a copy per adapter),
split the batch by adapter for that layer alone, so the base's matmuls still run over the whole batch.
`__base__` (PEFT's own name) answers through the untouched base. Each row is encoded with its own adapter's
task settings (max length, prompt template, chat format), so it answers as that adapter alone would.
evaluation/adapter_set.py checks a set before it is built (one base, LoRA only, no DoRA) and serves it.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from trainers import generation, loop, quantization, record, scoring, sft
from trainers.config import ConfigError, load_trial_config
from trainers.device import pick_device
from trainers.inference import check_base_reference, load_trained
from trainers.model import load_model, load_tokenizer

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in `adapter_names`
# A classification base has no trained head: `__base__` answers through one initialised from this seed (what
# a sweep's `base` arm scores with train.seed=0), so every process serving the set answers alike.
BASE_HEAD_SEED = 0


def load_adapter_set(adapters: dict[str, str], device: str = "auto"):
    """(model, tokenizer, {name: trial config}) for {name: adapter folder}, the first adapter's settings
    loading the base (evaluation/adapter_set.py has checked they share one); `__base__` maps to them too."""
    from peft import PeftModel

    if not adapters:
        raise ConfigError("an adapter set needs at least one adapter")
    cfgs = {name: load_trial_config(str(Path(path) / record.TRIAL_CONFIG_FILE)) for name, path in adapters.items()}
    first = next(iter(adapters))
    cfg = cfgs[first]
    for name, path in adapters.items():  # the base on this machine must be the one each was trained on
        check_base_reference(path, cfg)
    device = pick_device(device)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(BASE_HEAD_SEED)
    base = load_model(cfg, len(cfg.task.labels), tokenizer, device)
    model = PeftModel.from_pretrained(base, adapters[first], adapter_name=first)
    for name, path in list(adapters.items())[1:]:
        model.load_adapter(path, adapter_name=name)
    if device == "cpu":  # as load_trained: the trial scored through the same layers
        quantization.patch_cpu_layers(model)
    model.eval()
    return model, tokenizer, {**cfgs, BASE_ADAPTER: cfg}


def predict_set(model, tokenizer, cfgs: dict, inputs: list, names: list[str], device: str = "auto") -> list[str]:
    """What each row's adapter answers for it (`names[i]` for `inputs[i]`), all rows in mixed batches:
    label names for classification, generated text for sft, exactly as `predict_texts` with that adapter alone."""
    if len(names) != len(inputs):
        raise ValueError(f"{len(names)} adapter names for {len(inputs)} rows")
    device = pick_device(device)
    cfg = cfgs[BASE_ADAPTER]
    if cfg.task.type == "sft":
        prompts = [sft.prompt_ids(p, tokenizer, cfgs[n].task) for p, n in zip(inputs, names)]
        longest = max(cfgs[n].task.max_new_tokens for n in set(names))
        with loop.autocast_for(device, cfg.train.precision):
            ids = generation.generate_ids(model, tokenizer, prompts, longest, scoring.eval_batch_size(cfg), device,
                                          adapter_names=names)
        # greedy tokens do not depend on how far decoding goes on: each row keeps its own adapter's length
        return [generation.text_of(tokenizer, _within(row, cfgs[n].task.max_new_tokens, tokenizer.eos_token_id))
                for row, n in zip(ids, names)]
    encoded = _encode_each(inputs, names, tokenizer, cfgs)
    preds, _, _ = scoring.predict(model, encoded, tokenizer, cfg, device, adapter_names=names)
    return [cfgs[n].task.labels[p] for p, n in zip(preds, names)]


def _within(row: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    row = row[:max_new_tokens]
    return row[: row.index(eos) + 1] if eos in row else row


def _encode_each(inputs: list, names: list[str], tokenizer, cfgs: dict):
    """The rows encoded by their own adapter's task settings, back in request order, as one split."""
    from datasets import Dataset

    rows: list = [None] * len(inputs)
    for name in dict.fromkeys(names):
        where = [i for i, n in enumerate(names) if n == name]
        frame = pd.DataFrame({"text": [str(inputs[i]) for i in where], "label": [0] * len(where)})
        for i, row in zip(where, scoring.encode(frame, tokenizer, cfgs[name])):
            rows[i] = row
    return Dataset.from_list(rows)


def save_merged(weights_dir: str, dest: str):
    """Fold the adapter in `weights_dir` into its full-precision base and write it as a plain transformers
    folder (safetensors weights, config with the label names, tokenizer); returns (model, tokenizer, cfg)
    of the merged model, for the merge-damage check. A quantized-trained adapter is merged into the
    unquantized base, as promotion measures it."""
    model, tokenizer, cfg = load_trained(weights_dir, base_quant="none", merge=True)
    if not cfg.method.is_adapter:
        raise ConfigError(f"{weights_dir} holds a full model, not an adapter: nothing to merge")
    if cfg.task.type == "classification":  # a plain `pipeline` then answers with the label names
        model.config.id2label = dict(enumerate(cfg.task.labels))
        model.config.label2id = {label: i for i, label in enumerate(cfg.task.labels)}
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return model, tokenizer, cfg
