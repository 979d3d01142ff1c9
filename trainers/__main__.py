"""Run one trial without Ray: the overhead baseline and the way to debug a single configuration.

    python -m trainers --config peftsweep_trial.yaml train.lr=5e-4     (a trial config saved by a run)
    python -m trainers method.r=16 tracking.enabled=false              (edits of the built-in defaults)

Overrides are dotted `section.key=value` edits of the trial schema (trainers/config.py). Config groups
(`model=smollm2_135m`) belong to the sweep's Hydra tree: `peftsweep trial model=smollm2_135m ...` composes
them and runs the same trial, also without Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import yaml

from trainers.config import (TRIAL_SECTIONS, ConfigError, TrialConfig, apply_dotted_overrides,
                             trial_config_from_dict, trial_config_to_dict)


def load(config: str | None, overrides: list[str]) -> TrialConfig:
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if "=" in item and "." not in key and key in TRIAL_SECTIONS + ("search", "searcher", "scheduler", "cluster"):
            raise ConfigError(f"{item!r} selects a config group: run `peftsweep trial {' '.join(overrides)}` "
                              "(the sweep's config tree, no Ray), or give dotted keys such as model.path=...")
    data = trial_config_to_dict(TrialConfig())
    if config is not None:
        with open(config) as fh:
            loaded = yaml.safe_load(fh) or {}
        for section, values in loaded.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
    return trial_config_from_dict(apply_dotted_overrides(data, overrides))


def run(cfg: TrialConfig, as_json: bool = False) -> int:
    """Validate, then run one trial in this process; exit code 2 for a config that cannot run."""
    from trainers.validate import validate_trial

    problems = validate_trial(cfg)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    from trainers.trial import run_trial_with_oom_retries

    results = run_trial_with_oom_retries(cfg)
    print(json.dumps(results) if as_json else yaml.safe_dump(results, sort_keys=False))
    return 0 if results.get("status") == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    # Library chatter (load reports, progress bars, deprecation notes) buries the trial's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="trial YAML (a resolved trial config, e.g. from an MLflow run)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("overrides", nargs="*", help="dotted key=value edits, e.g. method.r=16")
    args = parser.parse_args(argv)
    try:
        return run(load(args.config, args.overrides), args.json)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def exit_now(code: int) -> None:
    """Exit once the trial's record is written: run the atexit handlers (libraries flush there), then skip
    the interpreter's teardown of torch, transformers and the model, ~2 s of a standalone trial's wall time
    on 2 cores that writes nothing."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
