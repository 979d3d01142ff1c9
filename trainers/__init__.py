"""One trial, Ray-free: `python -m trainers [--config trial.yaml] [key=value ...]`."""
import logging

# bitsandbytes warns at import that an optional CPU kernel package is missing; the fallback is fine.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from trainers.config import ConfigError, TrialConfig, load_trial_config, trial_config_from_dict

__all__ = ["ConfigError", "TrialConfig", "load_trial_config", "trial_config_from_dict", "run_trial"]


def run_trial(*args, **kwargs):
    from trainers.trial import run_trial as _run

    return _run(*args, **kwargs)
