"""Target-module presets resolved from the loaded model's own module names.

A preset names a role (attention q,v / all attention projections / MLP / every linear layer); each model
family spells those roles differently (BERT `query`, Llama `q_proj`, GPT-2's fused `c_attn`), so the
preset is resolved against the real module tree and the resolved list is what gets logged.
"""
from __future__ import annotations

import re

import torch.nn as nn

from trainers.config import ConfigError

_Q = {"query", "q_proj", "q", "q_lin"}
_K = {"key", "k_proj", "k", "k_lin"}
_V = {"value", "v_proj", "v", "v_lin"}
_O = {"o_proj", "out_proj", "o", "out_lin"}
_FUSED_QKV = {"c_attn", "qkv_proj", "query_key_value", "Wqkv"}
_MLP = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "lin1", "lin2",
        "dense_h_to_4h", "dense_4h_to_h"}
# Task heads are trained whole (peft's modules_to_save), never adapted.
_HEADS = {"classifier", "score", "lm_head", "qa_outputs"}


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2 uses transformers' Conv1D.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for name, module in model.named_modules():
        if not _is_linear(module) or any(p in _HEADS for p in name.split(".")):
            continue
        if "lora_" in name or "base_layer" in name:  # already wrapped by peft
            continue
        out[name] = module
    return out


def _role(name: str) -> str | None:
    last = name.split(".")[-1]
    if last in _Q: return "q"
    if last in _K: return "k"
    if last in _V: return "v"
    if last in _FUSED_QKV: return "qkv"
    if last in _O or name.endswith("attention.output.dense") or name.endswith("attn.c_proj"):
        return "o"
    if last in _MLP or name.endswith("intermediate.dense") or name.endswith(".output.dense") \
            or name.endswith("mlp.c_proj"):
        return "mlp"
    return None


_PRESET_ROLES = {"attention_qv": {"q", "v"}, "attention": {"q", "k", "v", "o"}, "mlp": {"mlp"}}


def resolve_target_modules(model: nn.Module, spec) -> list[str]:
    """Full module names the method will wrap. Raises ConfigError naming what the model has instead."""
    linears = linear_modules(model)
    if isinstance(spec, str):
        if spec == "all_linear":
            names = list(linears)
        else:
            roles = _PRESET_ROLES[spec]
            if roles & {"q", "k", "v"} and not any(_role(n) in ("q", "k", "v") for n in linears):
                roles = (roles - {"q", "k", "v"}) | {"qkv"}  # GPT-2 style: q,k,v fused in one layer
            names = [n for n in linears if _role(n) in roles]
        if not names:
            raise ConfigError(f"target-module preset {spec!r} matches no layer of this model "
                              f"(its linear layers: {', '.join(module_kinds(linears))})")
        return names
    names = []
    for wanted in spec:
        hits = [n for n in linears if n == wanted or n.endswith("." + wanted)]
        if not hits:
            raise ConfigError(f"target module {wanted!r} is not a linear layer of this model "
                              f"(it has: {', '.join(module_kinds(linears))})")
        names += [h for h in hits if h not in names]
    return names


def module_kinds(names) -> list[str]:
    """Distinct last name components: `query, key, value, dense`."""
    return sorted({n.split(".")[-1] for n in names})


def summarize(names: list[str]) -> str:
    """Compact, loggable form: layer indices folded to `*` (`bert.encoder.layer.*.attention.self.query`)."""
    seen = []
    for n in names:
        pattern = re.sub(r"\.\d+\.", ".*.", n)
        if pattern not in seen:
            seen.append(pattern)
    return ",".join(seen)


def min_dim(module: nn.Module) -> int:
    if hasattr(module, "in_features"):
        return min(module.in_features, module.out_features)
    return min(module.weight.shape)  # Conv1D: (in, out)
