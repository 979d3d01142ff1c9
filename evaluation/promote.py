"""`peftsweep promote`: register the winning adapter of a sweep in the MLflow Model Registry, check in a
fresh process that `models:/<name>/<version>` reloads onto its exact base model and reproduces the logged
metric, then move the alias.

The alias only moves after the gate and the reload check pass, so a bad version never becomes the
champion; earlier versions stay registered. The version carries the adapter only (weights,
adapter_config.json, the trial config), the base model's reference with a content hash or revision, the
quantization settings, and a model card with the sweep's table.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from evaluation import verdicts
from evaluation.report import arm_table, data_of, markdown, with_verdicts
from evaluation.runs import full_ft_arm, sweep_metric, trial_table
from trainers import record
from trainers.tracking import find_parent

PYFUNC_DIR = "pyfunc_model"
MODEL_CARD = "README.md"


class PromotionRefused(RuntimeError):
    """The gate said no; the alias was left where it was."""


@dataclass
class Winner:
    run: dict  # the trial-table row of the run to register
    arm: dict  # the arm-table row it belongs to
    reason: str


def cheapest_shippable(adapters, shippable: list, metric: str, cost: str = "peak_mem"):
    """The arm-table row `best` promotes: of the best arm and the tied arms shown within the margin of it
    (verdicts.shown_within), the cheapest by `cost` (peak memory or device-hours), then by trainable
    parameters, then the better validation mean."""
    best_first = record.metric_mode(metric) != "max"
    column = "peak_mem_gb" if cost == "peak_mem" else "device_hours_per_run"
    ties = adapters[adapters["arm"].isin(shippable)]
    return ties.sort_values([column, "trainable_params", "val_mean"], ascending=[True, True, best_first]).iloc[0]


def _tie_reason(decision, n_tied: int, shippable: list, cost: str) -> str:
    noise = decision.seed_noise.get("val")
    counted = (f"rows and seeds counted (seed noise measured over the sweep's arms, {noise.df:g} df)"
               if noise is not None and noise.source == "measured" else "rows counted, one seed an arm")
    head = (f"{n_tied} arms tie with the best, {decision.best['val']}, within noise on "
            f"{decision.split_rows.get('val', 0):,} validation rows (paired 95 % intervals of the difference "
            f"include 0; {counted})")
    if len(shippable) > 1:
        return head + (f"; {len(shippable)} of them are shown within the margin ({decision.margin:g}) of it: "
                       f"picked the cheapest by {cost}")
    return head + (f"; none of the others is shown within the margin ({decision.margin:g}) of it, so it ships: "
                   "a cheaper tied arm may trail it by more, and the data cannot say")


def choose(trials, metric: str, rule: str = "best", within_points: float = 1.0, cost: str = "peak_mem",
           memory_budget_gb: float | None = None, decision=None) -> Winner:
    """Pick the arm by validation metrics (test is for reporting, not picking), then its best seed's run.
    With `decision` (evaluation/verdicts.py: paired intervals over the validation rows, seeds counted once
    measured), `best` takes the cheapest of the best arm and the tied arms shown within the margin of it, and
    says how many arms tie; `cheapest_within` needs an arm's interval, not its mean, to clear -within_points."""
    table = arm_table(trials, metric)
    # lower-is-better metrics (a loss) rank the other way; `sign * value` is always higher-better
    best_first, sign = (False, 1) if record.metric_mode(metric) == "max" else (True, -1)
    word = "highest" if sign == 1 else "lowest"
    adapters = table[~table["method"].isin(["full", "base"]) & (table["runs_ok"] > 0)]
    if adapters.empty:
        raise PromotionRefused("no adapter arm finished ok: nothing to promote")
    tied = decision.ties.get("val", []) if decision is not None else []
    shippable = (decision.shippable.get("val") or [decision.best.get("val")]) if decision is not None else []
    against_full = decision.vs_full.get("val", {}) if decision is not None else {}
    column = "peak_mem_gb" if cost == "peak_mem" else "device_hours_per_run"
    if rule == "best" and len(tied) > 1:
        arm = cheapest_shippable(adapters, shippable, metric, cost)
        reason = _tie_reason(decision, int(adapters["arm"].isin(tied).sum()), shippable, cost)
    elif rule == "best":
        arm = adapters.sort_values("val_mean", ascending=best_first).iloc[0]
        reason = f"{word} mean val {metric} ({arm['val_mean']:.2f})" + (
            ", ahead of every other arm beyond noise" if decision is not None and tied else "")
    elif rule == "cheapest_within" and against_full:
        # the lower bound (for a loss: the upper) of the paired difference must clear -within_points
        clear = [a for a, c in against_full.items() if (c.low if sign == 1 else -c.high) > -within_points]
        close = adapters[adapters["arm"].isin(clear)]
        if close.empty:
            raise PromotionRefused(f"no adapter arm's paired 95 % interval vs full FT on validation clears "
                                   f"-{within_points} pts of val {metric}")
        arm = close.sort_values([column, "val_mean"], ascending=[True, best_first]).iloc[0]
        reason = (f"lowest {cost} among adapters whose paired 95 % interval vs full FT on validation stays above "
                  f"-{within_points} pts")
    elif rule == "cheapest_within":
        full = table[table["arm"] == full_ft_arm(trials, metric)]  # the baseline the report compares with
        if full.empty:
            raise PromotionRefused("rule cheapest_within needs a full fine-tuning arm that finished ok")
        bar = sign * full.iloc[0]["val_mean"] - within_points
        close = adapters[sign * adapters["val_mean"] >= bar]
        if close.empty:
            raise PromotionRefused(f"no adapter arm is within {within_points} pts of full FT's val {metric} "
                                   f"({full.iloc[0]['val_mean']:.2f})")
        arm = close.sort_values([column, "val_mean"], ascending=[True, best_first]).iloc[0]
        reason = f"lowest {cost} among adapters within {within_points} pts of full FT's val {metric}"
    elif rule == "best_under_budget":
        fits = adapters[adapters["peak_mem_gb"] <= memory_budget_gb]
        if fits.empty:
            raise PromotionRefused(f"no adapter arm's peak memory fits {memory_budget_gb} GB "
                                   f"(smallest: {adapters['peak_mem_gb'].min():.2f} GB)")
        arm = fits.sort_values("val_mean", ascending=best_first).iloc[0]
        reason = f"{word} mean val {metric} with peak memory <= {memory_budget_gb} GB"
    else:
        raise PromotionRefused(f"unknown promotion rule {rule!r}")
    runs = trials[(trials["arm"] == arm["arm"]) & (trials["status"] == "ok")]
    run = runs.sort_values(record.metric_key("val", metric), ascending=best_first).iloc[0]
    return Winner(run=run.to_dict(), arm=arm.to_dict(), reason=reason)


def _tag(value) -> str:
    """Registry tags as people write them: r=8, not r=8.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _download(uri: str, tracking_uri: str, dest: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, dst_path=dest)


def reload_check(model_uri: str, tracking_uri: str, logged: float, metric: str, tolerance_points: float) -> float:
    """Load the version exactly as a consumer would (`mlflow.pyfunc.load_model` in a new interpreter), predict
    the held-out test split from raw text, and return the reproduced metric; PromotionRefused if it strays."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run([sys.executable, "-m", "evaluation.reload_check", model_uri, metric], capture_output=True,
                          text=True, env=env, cwd=str(Path(__file__).resolve().parent.parent))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PromotionRefused(f"{model_uri} does not reload: {last}")
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    if answer["metric"] != metric:  # the check's contract: the figure compared is the figure reproduced
        raise PromotionRefused(f"{model_uri} reload check scored {answer['metric']}, not {metric}")
    reproduced = answer["value"]
    scale = record.metric_scale(metric)
    if math.isnan(reproduced) or abs(reproduced - logged) * scale > tolerance_points:
        raise PromotionRefused(f"{model_uri} reloads to test {metric} {scale * reproduced:.2f} but the run logged "
                               f"{scale * logged:.2f} (tolerance {tolerance_points} pts)")
    return reproduced


def merge_damage(weights: str, metric: str, logged: float, merged=None) -> dict:
    """An adapter trained on a quantized base, merged into the full-precision base (how it is often
    shipped): its test metric and the points lost against the quantized-base figure (transformers#31293).
    `merged`: the (model, tokenizer, config) already merged (`peftsweep export --format merged`)."""
    from trainers import load_trained, score_split

    model, tokenizer, cfg = merged or load_trained(weights, base_quant="none", merge=True)
    merged = score_split(model, tokenizer, cfg, "test")[record.metric_key("test", metric)]
    return {f"merged_fp_test_{metric}": merged,
            "merge_damage_pts": round(record.metric_scale(metric) * (logged - merged), 2)}


def verdict_of(decision, arm: str) -> tuple[str, dict]:
    """The promoted arm's test verdict against full FT as a model-card line and registry tags; nothing when
    the sweep has no paired comparison (no full-FT arm, no per-row scores)."""
    c = decision.vs_full.get("test", {}).get(arm) if decision is not None else None
    if c is None:
        return "", {}
    line = (f"- against full fine-tuning (`{c.reference}`) on test: {c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}] "
            f"(paired 95 % interval over {decision.split_rows.get('test', 0):,} rows, {c.pairing}): "
            f"**{c.verdict.replace('_', '-')}** at a margin of ±{decision.margin:g}")
    return line, {"verdict_vs_full_ft": c.verdict, "delta_vs_full_ft_low": round(c.low, 2),
                  "delta_vs_full_ft_high": round(c.high, 2), "verdict_margin": decision.margin}


def model_card(name: str, version_hint: str, winner: Winner, base: dict, sweep: str, table_md: str,
               metric: str, data: str = "", verdict_line: str = "") -> str:
    run = winner.run
    quant = run["quantization"]
    return "\n".join([
        f"# {name}", "",
        f"Adapter promoted by peftsweep from sweep `{sweep}` ({winner.reason}).", "",
        *([f"- fitted on {data}"] if data else []),
        f"- arm: `{run['arm']}`, seed {_tag(run['seed'])}, MLflow run `{run['run_id']}`",
        f"- method: {run['method']}, r={_tag(run['r'])}, alpha={_tag(run['alpha'])}, "
        f"modules: {run['target_modules']} → {run['target_modules_resolved']}",
        f"- quantization of the base during training: {quant}",
        f"- test {metric}: {record.metric_scale(metric) * run[record.metric_key('test', metric)]:.2f}"
        f"{' %' if record.metric_scale(metric) == 100 else ''}, "
        f"{winner.arm['test_delta_pts']:+.2f} pts vs full fine-tuning (arm mean)",
        *([verdict_line] if verdict_line else []),
        f"- base model: `{base['path']}`" + (f" (gguf `{base['gguf_file']}`)" if base.get("gguf_file") else "")
        + (f", sha256 `{base['sha256']}`" if base.get("sha256") else "")
        + (f", revision `{base['revision']}`" if base.get("revision") else ""), "",
        "Load it: `mlflow.pyfunc.load_model(\"models:/" + f"{name}@{version_hint}\")` ("
        + ("a `text` column in, label names out" if run.get("task_type") != "sft" else
           "a `prompt` column (or `messages`: the conversation so far) in, the generated answer out")
        + "). The base model is loaded from the reference above and checked against its hash.",
        "", table_md])


def promote(client, tracking_uri: str, experiment: str, sweep_id: str | None, promote_cfg,
            metric: str = "accuracy", margin: float = 1.0) -> dict:
    """`margin`: how close to full FT counts as close enough (report.margin); `cheapest_within` uses
    promote_cfg.within_points instead when it is set."""
    from mlflow.exceptions import MlflowException

    from evaluation.serving import save_pyfunc
    from trainers import write_base_reference

    parent = find_parent(client, experiment, sweep_id)
    sweep = parent.data.tags.get(record.SWEEP_ID, parent.info.run_name)
    trials = trial_table(client, parent)
    metric = sweep_metric(parent, trials, metric)
    # paired over the validation and test rows every arm was scored on: ties, bounds and verdicts
    within = promote_cfg.within_points if promote_cfg.within_points is not None else margin
    decision = verdicts.decide(client, trials, metric, within)
    winner = choose(trials, metric, promote_cfg.rule, within, promote_cfg.cost, promote_cfg.memory_budget_gb,
                    decision)
    delta = winner.arm["test_delta_pts"]
    worse = -delta if record.metric_mode(metric) == "max" else delta  # how far behind full FT it is
    if promote_cfg.max_delta is not None and not (worse <= promote_cfg.max_delta):
        why = "no full-FT arm to compare with" if delta != delta else f"{worse:.2f} pts worse than full FT"
        raise PromotionRefused(f"winner {winner.arm['arm']} is {why} (max_delta {promote_cfg.max_delta}); "
                               f"alias {promote_cfg.alias!r} unchanged")
    run = winner.run
    # the sweep's own name (sweeps.config.sweep_name), which a sweep over other data than its task's does not
    # share with the task; a sweep recorded before it was logged: <task>-<model>, as it was named then
    params = parent.data.params
    name = promote_cfg.registered_model or params.get("name") or f"{params.get('task')}-{params.get('model')}"
    alias = promote_cfg.alias
    try:
        client.create_registered_model(name, description=f"Adapters promoted by peftsweep from {experiment}")
    except MlflowException:
        pass  # exists already: add a version
    table_md = markdown(with_verdicts(arm_table(trials, metric), decision), trials, metric, sweep,
                        data=data_of(parent), decision=decision)
    verdict_line, verdict_tags = verdict_of(decision, run["arm"])
    sft_task = run.get("task_type") == "sft"
    logged = run[record.metric_key("test", metric)]
    with tempfile.TemporaryDirectory() as tmp:
        # The trial's adapter folder, plus the base reference, wrapped as a pyfunc model (so the registry
        # serves it) and stored beside the adapter in the trial's run.
        Path(tmp, "dl").mkdir()
        weights = _download(f"{run['artifact_uri']}/{record.ADAPTER_DIR}", tracking_uri, f"{tmp}/dl")
        base = write_base_reference(weights)
        card = model_card(name, alias, winner, base, sweep, table_md, metric, data_of(parent), verdict_line)
        Path(weights, MODEL_CARD).write_text(card)
        extra = merge_damage(weights, metric, logged) if run["quantization"] not in (None, "none") else {}
        client.log_artifacts(run["run_id"], save_pyfunc(weights, f"{tmp}/{PYFUNC_DIR}", sft_task), PYFUNC_DIR)
    if extra:
        client.log_metric(run["run_id"], f"merged_fp_test_{metric}", extra[f"merged_fp_test_{metric}"])
    tags = {"base_model": base["path"], "base_model_sha256": base["sha256"] or "",
            "base_model_revision": base["revision"] or ("" if base["sha256"] else "unpinned"),
            "base_model_gguf_file": base["gguf_file"] or "", "base_model_name": run["model"],
            "method": run["method"], "r": run["r"], "alpha": run["alpha"], "target_modules": run["target_modules"],
            "target_modules_resolved": run["target_modules_resolved"], "quantization": run["quantization"],
            "double_quant": run.get("double_quant"), "compute_dtype": run.get("compute_dtype"),
            "lr": run["lr"], "seed": run["seed"], "sweep_id": sweep, "arm": run["arm"],
            f"test_{metric}": logged, "delta_vs_full_ft_pts": round(float(delta), 2), "selection": winner.reason,
            **verdict_tags,
            **extra}
    version = client.create_model_version(name, source=f"{run['artifact_uri']}/{PYFUNC_DIR}", run_id=run["run_id"],
                                          tags={k: _tag(v) for k, v in tags.items() if v is not None},
                                          description=card[:5000])
    uri = f"models:/{name}/{version.version}"
    try:
        reproduced = reload_check(uri, tracking_uri, logged, metric, promote_cfg.tolerance_points)
    except PromotionRefused as exc:
        client.set_model_version_tag(name, version.version, "reload_check", f"failed: {str(exc)[:400]}")
        raise PromotionRefused(f"{exc}; alias {alias!r} unchanged") from None
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "reload_check", f"test_{metric}={reproduced:.4f}")
    return {"name": name, "version": version.version, "alias": alias, "arm": run["arm"], "run_id": run["run_id"],
            "logged": logged, "reproduced": reproduced, "delta_vs_full_ft_pts": delta, "reason": winner.reason,
            "uri": f"models:/{name}@{alias}", "base": base, "metric": metric, **extra}
