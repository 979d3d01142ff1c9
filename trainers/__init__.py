"""One trial, Ray-free: `python -m trainers [--config trial.yaml] [key=value ...]`."""
from trainers.config import ConfigError, TrialConfig, load_trial_config, trial_config_from_dict

__all__ = ["ConfigError", "TrialConfig", "load_trial_config", "trial_config_from_dict", "run_trial"]


def run_trial(*args, **kwargs):
    from trainers.trial import run_trial as _run

    return _run(*args, **kwargs)
