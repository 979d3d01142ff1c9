"""The Ray Tune trainable: turns a sampled point into a trial config and hands it to `trainers`."""
from __future__ import annotations

from trainers.config import trial_config_from_dict


def trial_dict_for(params: dict, base: dict, search) -> dict:
    from sweeps.space import labelled_arms, resolve_trial

    sampled = {k: v for k, v in params.items() if k not in ("arm", "seed")}
    return resolve_trial(base, search, labelled_arms(search, base)[params["arm"]], params["seed"], sampled)


def ray_trial(params: dict, base: dict, search, cpus: float) -> None:
    from ray import tune

    from trainers.trial import run_trial

    cfg = trial_config_from_dict(trial_dict_for(params, base, search))
    # Tune only stops a trial between reports; the trainer reports at each eval and at the end.
    run_trial(cfg, report=tune.report, num_threads=max(1, int(cpus)))
