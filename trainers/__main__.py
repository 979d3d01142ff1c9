"""Run one trial without Ray: the overhead baseline and the way to debug a single configuration.

    python -m trainers --config trial.yaml train.lr=5e-4 method.r=16 tracking.enabled=false
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from trainers.config import ConfigError, trial_config_from_dict, trial_config_to_dict, TrialConfig


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="trial YAML (a resolved trial config, e.g. from an MLflow run)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        data = trial_config_to_dict(TrialConfig())
        if args.config:
            with open(args.config) as fh:
                loaded = yaml.safe_load(fh) or {}
            for section, values in loaded.items():
                if isinstance(values, dict) and isinstance(data.get(section), dict):
                    data[section].update(values)
                else:
                    data[section] = values
        cfg = trial_config_from_dict(apply_overrides(data, args.overrides))
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
