"""Run one trial without Ray: the overhead baseline and the way to debug a single configuration.

    python -m trainers model=smollm2_135m task=rotten_tomatoes_sft method.r=16 tracking.enabled=false
    python -m trainers --config peftsweep_trial.yaml train.lr=5e-4     (a trial config saved by a run)

Without --config the overrides are Hydra's, over the same config tree as `peftsweep sweep` (search,
scheduler and cluster are ignored); with --config they are dotted key=value edits of that file.
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from trainers.config import ConfigError, trial_config_from_dict, trial_config_to_dict, TrialConfig

TRIAL_SECTIONS = ("model", "task", "method", "quant", "train", "tracking", "output_dir")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load(config: str | None, overrides: list[str]) -> TrialConfig:
    if config is None:
        from trainers.composition import compose

        composed = compose(overrides)
        return trial_config_from_dict({k: composed[k] for k in TRIAL_SECTIONS if k in composed})
    data = trial_config_to_dict(TrialConfig())
    with open(config) as fh:
        loaded = yaml.safe_load(fh) or {}
    for section, values in loaded.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    return trial_config_from_dict(apply_overrides(data, overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="trial YAML (a resolved trial config, e.g. from an MLflow run)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (dotted key=value edits with --config)")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        from trainers.validate import validate_trial

        problems = validate_trial(cfg)
        if problems:
            for p in problems:
                print(f"error: {p}", file=sys.stderr)
            return 2
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from trainers.trial import run_trial_with_oom_retries

    results = run_trial_with_oom_retries(cfg)
    print(json.dumps(results) if args.json else yaml.safe_dump(results, sort_keys=False))
    return 0 if results.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
