"""`peftsweep promote`: register the winning adapter of a sweep in the MLflow Model Registry, check that
`models:/<name>@<alias>` reloads onto its base model and reproduces the logged metric, then move the alias.

The alias only moves after the check passes, so a bad version never becomes the champion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from evaluation.report import arm_table
from evaluation.runs import find_parent, trial_table
from trainers import record


PYFUNC_DIR = "pyfunc_model"


class PromotionRefused(RuntimeError):
    """The gate said no; the alias was left where it was."""


@dataclass
class Winner:
    run: dict  # the trial-table row of the run to register
    arm: dict  # the arm-table row it belongs to
    reason: str


def choose(trials, metric: str, rule: str = "best", within_points: float = 1.0) -> Winner:
    """best: the adapter arm with the highest mean validation metric (test is for reporting, not picking);
    cheapest_within: the lowest peak memory among adapter arms within `within_points` of the best."""
    table = arm_table(trials, metric)
    adapters = table[(table["method"] != "full") & (table["runs_ok"] > 0)]
    if adapters.empty:
        raise PromotionRefused("no adapter arm finished ok: nothing to promote")
    best = adapters.sort_values("val_mean", ascending=False).iloc[0]
    if rule == "best":
        arm, reason = best, f"highest mean val {metric} ({best['val_mean']:.2f})"
    elif rule == "cheapest_within":
        close = adapters[adapters["val_mean"] >= best["val_mean"] - within_points]
        arm = close.sort_values("peak_mem_gb").iloc[0]
        reason = f"lowest peak memory within {within_points} pts of the best val {metric}"
    else:
        raise ValueError(f"unknown promotion rule {rule!r} (best, cheapest_within)")
    runs = trials[(trials["arm"] == arm["arm"]) & (trials["status"] == "ok")]
    run = runs.sort_values(record.metric_key("val", metric), ascending=False).iloc[0]
    return Winner(run=run.to_dict(), arm=arm.to_dict(), reason=reason)


def _tag(value) -> str:
    """Registry tags as people write them: r=8, not r=8.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _download(uri: str, tracking_uri: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)


def reload_check(model_uri: str, tracking_uri: str, logged: float, metric: str, tolerance_points: float) -> float:
    """Load the registered version exactly as a consumer would (`mlflow.pyfunc.load_model`), predict the
    held-out test split from raw text, and return the reproduced metric; raise PromotionRefused if it
    strays from the logged one."""
    import mlflow
    import pandas as pd

    from trainers import data
    from trainers.metrics import classification_metrics

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    cfg = model.unwrap_python_model().cfg
    test = data.load_splits(cfg.task)["test"]
    predicted = list(model.predict(pd.DataFrame({"text": test["text"]})))
    index = {label: i for i, label in enumerate(cfg.task.labels)}
    reproduced = classification_metrics([index[p] for p in predicted], list(test["label"]),
                                        len(cfg.task.labels))[metric]
    if math.isnan(reproduced) or abs(reproduced - logged) * 100 > tolerance_points:
        raise PromotionRefused(f"{model_uri} reloads to test {metric} {100 * reproduced:.2f} but the run logged "
                               f"{100 * logged:.2f} (tolerance {tolerance_points} pts)")
    return reproduced


def reload_check_direct(model_uri: str, tracking_uri: str, logged: float, metric: str,
                        tolerance_points: float) -> float:
    """Causal-LM adapters (no pyfunc flavour yet): load the registered folder onto its base and score test."""
    from trainers.inference import load_trained, score_split

    model, tokenizer, cfg = load_trained(_download(model_uri, tracking_uri))
    reproduced = score_split(model, tokenizer, cfg, "test")[record.metric_key("test", metric)]
    if math.isnan(reproduced) or abs(reproduced - logged) * 100 > tolerance_points:
        raise PromotionRefused(f"{model_uri} reloads to test {metric} {100 * reproduced:.2f} but the run logged "
                               f"{100 * logged:.2f} (tolerance {tolerance_points} pts)")
    return reproduced


def promote(client, tracking_uri: str, experiment: str, sweep_id: str | None, promote_cfg,
            metric: str = "accuracy") -> dict:
    parent = find_parent(client, experiment, sweep_id)
    sweep = parent.data.tags.get(record.SWEEP_ID, parent.info.run_name)
    trials = trial_table(client, parent)
    winner = choose(trials, metric, promote_cfg.rule, promote_cfg.within_points)
    delta = winner.arm["test_delta_pts"]
    if promote_cfg.max_delta is not None and not (delta >= -promote_cfg.max_delta):
        raise PromotionRefused(f"winner {winner.arm['arm']} is {-delta:.2f} pts below full FT "
                               f"(max_delta {promote_cfg.max_delta}); alias {promote_cfg.alias!r} unchanged")
    run = winner.run
    name = promote_cfg.registered_model or f"{parent.data.params.get('task')}-{parent.data.params.get('model')}"
    alias = promote_cfg.alias
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=f"Adapters promoted by peftsweep from {experiment}")
    except MlflowException:
        pass  # exists already: add a version
    # Wrap the trial's adapter folder as a pyfunc model (so the registry serves it), stored beside it in the
    # trial's run; a plain artifact folder is not an MLflow Model, so register that location directly.
    import tempfile

    from evaluation.serving import save_pyfunc

    from trainers.config import load_trial_config

    weights = _download(f"{run['artifact_uri']}/{record.ADAPTER_DIR}", tracking_uri)
    servable = load_trial_config(f"{weights}/{record.TRIAL_CONFIG_FILE}").task.type == "classification"
    if servable:
        with tempfile.TemporaryDirectory() as tmp:
            client.log_artifacts(run["run_id"], save_pyfunc(weights, f"{tmp}/{PYFUNC_DIR}"), PYFUNC_DIR)
    source = f"{run['artifact_uri']}/{PYFUNC_DIR if servable else record.ADAPTER_DIR}"
    tags = {"base_model": run["model_path"], "base_model_name": run["model"], "method": run["method"],
            "r": run["r"], "alpha": run["alpha"], "target_modules": run["target_modules"],
            "target_modules_resolved": run["target_modules_resolved"], "quantization": run["quantization"],
            "lr": run["lr"], "seed": run["seed"], "sweep_id": sweep, "arm": run["arm"],
            f"test_{metric}": run[record.metric_key("test", metric)],
            "delta_vs_full_ft_pts": round(float(delta), 2), "selection": winner.reason}
    version = client.create_model_version(name, source=source, run_id=run["run_id"],
                                          tags={k: _tag(v) for k, v in tags.items()},
                                          description=f"{run['arm']} seed {run['seed']} from sweep {sweep}")
    logged = run[record.metric_key("test", metric)]
    check = reload_check if servable else reload_check_direct
    reproduced = check(f"models:/{name}/{version.version}", tracking_uri, logged, metric, promote_cfg.tolerance_points)
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "reload_check", f"test_{metric}={reproduced:.4f}")
    return {"name": name, "version": version.version, "alias": alias, "arm": run["arm"], "run_id": run["run_id"],
            "logged": logged, "reproduced": reproduced, "delta_vs_full_ft_pts": delta, "reason": winner.reason,
            "uri": f"models:/{name}@{alias}"}
