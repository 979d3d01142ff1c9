"""One trial, Ray-free: `python -m trainers [--config trial.yaml] [key=value ...]`.

This package's public API, for the sweep layer, evaluation, notebooks and serving. `record` (the names a
trial writes), `tracking` (the one MLflow module) and `config` (the schema) are public modules; everything
else in `trainers` is internal (an import-linter contract in `make test` keeps `evaluation` to this surface).
Heavy libraries load on first use of a function, not on `import trainers`.
"""
import logging

# bitsandbytes warns at import that an optional CPU kernel package is missing; the fallback is fine.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from trainers.config import ConfigError, TrialConfig, load_trial_config, trial_config_from_dict  # noqa: E402

_LAZY = {
    "run_trial": "trainers.trial", "run_trial_with_oom_retries": "trainers.trial",
    "validate_trial": "trainers.validate", "predict_trial": "trainers.estimate",
    "predict_train_flops": "trainers.estimate",
    "load_trained": "trainers.inference", "write_base_reference": "trainers.inference",
    "score_split": "trainers.scoring", "predict_texts": "trainers.scoring", "split_inputs": "trainers.scoring",
    "score_predictions": "trainers.scoring", "input_column": "trainers.scoring",
    "StopTrial": "trainers.tracking", "load_row_scores": "trainers.tracking",
    "BASE_MODEL_FILE": "trainers.inference",
    "load_adapter_set": "trainers.adapters", "predict_set": "trainers.adapters", "save_merged": "trainers.adapters",
    "BASE_ADAPTER": "trainers.adapters", "BASE_HEAD_SEED": "trainers.adapters", "model_dir": "trainers.model",
}

__all__ = ["ConfigError", "TrialConfig", "load_trial_config", "trial_config_from_dict", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
