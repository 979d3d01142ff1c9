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

    from trainers.loop import StopTrial

    cfg = trial_config_from_dict(trial_dict_for(params, base, search))

    def report(metrics: dict) -> None:
        # A scheduler (ASHA) stops a trial by exiting its thread inside tune.report; turn that into a
        # StopTrial so the trainer records `pruned` at this step before the thread ends.
        try:
            tune.report(metrics)
        except SystemExit:
            raise StopTrial(int(metrics.get("step", -1))) from None

    result = run_trial(cfg, report=report, num_threads=max(1, int(cpus)))
    if result["status"] == "pruned":
        raise SystemExit(0)  # what Ray's own stop does: end the trial thread quietly
