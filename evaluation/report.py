"""`peftsweep report`: every arm of a sweep against its full fine-tuning arm, from MLflow alone.

It opens with the answer (evaluation/verdicts.py): each adapter arm's difference from full FT with its 95 %
interval paired over the same test rows (and seeds), and its verdict against `report.margin`; the validation
tie set promotion picks from. Per arm (runs sharing a configuration, over seeds): mean and 95 % CI of the
task metric over seeds (the delta's seed-only interval where no row scores exist), peak memory, train time,
device-hours and cost with their ratios to full FT, trainable %, adapter MB; the Pareto frontier of metric
vs peak memory, vs train time and vs trainable parameters, and a rank × modules heat map. Written as
Markdown, self-contained HTML, PNG and JSON and logged to the sweep's parent run under `report/`.
Trials that failed, ran out of memory or were pruned are listed, not dropped.
"""
from __future__ import annotations

import base64
import html as html_lib
import json
import math
from pathlib import Path

import pandas as pd

from evaluation import plots, verdicts
from evaluation.report_sections import decision_lines, example_lines, examples_for, racing_lines
from evaluation.runs import full_ft_arm, racing_spent, sweep_metric, trial_table
from trainers import record
from trainers.tracking import find_parent

def _t95(dof: int) -> float:
    """The two-sided 95 % Student t quantile at `dof` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def ci95(values) -> float:
    """Half-width of the 95 % confidence interval of the mean; nan with fewer than two values."""
    values = [v for v in values if v == v]
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return _t95(n - 1) * sd / math.sqrt(n)


def pooled_ci95(by_seed: pd.Series, trains: pd.Series, own: pd.Series) -> pd.Series:
    """Each arm's 95 % half-width over seeds with the seed spread pooled over the arms that ran two or more
    (seeds move arms of one model and task alike): at 2 seeds an arm, an arm's own spread has 1 degree of
    freedom and a t quantile of 12.7 (the default demo printed 78.10 ± 11.44); pooled over 6 arms, 2.57. An
    arm at one seed gets the pooled spread too. `trains`: False for arms with no seed noise of their own
    (the base arm), which keep `own`."""
    spreads = [(len(v) - 1, float(pd.Series(v).var(ddof=1))) for v, t in zip(by_seed, trains) if t and len(v) >= 2]
    df = sum(k for k, _ in spreads)
    if not df:
        return own
    sd = math.sqrt(sum(k * var for k, var in spreads) / df)
    half = [_t95(df) * sd / math.sqrt(len(v)) if t and len(v) else o for v, t, o in zip(by_seed, trains, own)]
    return pd.Series(half, index=by_seed.index)


def delta_ci95(arm: dict, base: dict) -> float:
    """Half-width of the 95 % CI of mean(arm) - mean(base), values keyed by seed. Paired by seed when
    at least two seeds ran in both arms (the seed fixes data order and init, so pairing removes most of
    the seed-to-seed noise); otherwise Welch's interval from the two samples."""
    common = sorted(set(arm) & set(base))
    if len(common) >= 2:
        return ci95([arm[s] - base[s] for s in common])
    a, b = list(arm.values()), list(base.values())
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    va = sum((x - sum(a) / len(a)) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - sum(b) / len(b)) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return 0.0
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return _t95(max(1, int(dof))) * math.sqrt(va + vb)


def memory_column(trials: pd.DataFrame) -> str:
    """One memory figure compared everywhere: VRAM when the trials ran on GPUs; on CPU the peak the method
    controls: the most the C heap held at once above what it held before the model loaded (tensors live in
    it; the interpreter and libraries, ~1.2 GB, are left out), else the RSS peak above that point (which also
    counts freed pages glibc kept), else whole-process RSS, for runs that lack both."""
    for col in (record.PEAK_VRAM_RESERVED_GB, record.PEAK_TENSOR_MEMORY_GB, record.PEAK_RSS_ABOVE_BASELINE_GB):
        if col in trials and trials[col].notna().any():
            return col
    return record.PEAK_HOST_RSS_GB


def _by_seed(runs: pd.DataFrame, col: str, scale: float = 100.0) -> dict:
    if col not in runs:
        return {}
    return {int(s): scale * v for s, v in zip(runs["seed"], runs[col]) if v == v and s == s}


def arm_table(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per arm; `metric` is the bare task metric name (accuracy, rougeL, loss). Fractions are in
    points (x100), a loss as it is; `mode` says which way is better. Deltas against the full-FT arm and,
    when the sweep scored the untouched base model, against it too (`*_vs_base_pts`)."""
    mem = memory_column(trials)
    scale, mode = record.metric_scale(metric), record.metric_mode(metric)
    ok = trials[trials["status"] == "ok"]
    full_runs = ok[ok["arm"] == full_ft_arm(trials, metric)]  # one baseline, for means and intervals alike
    rows = []
    for arm, group in trials.groupby("arm", sort=False):
        good = ok[ok["arm"] == arm]
        first = group.iloc[0]
        row = {"arm": arm, "method": first["method"], "r": first["r"], "alpha": first["alpha"],
               "target_modules": first["target_modules"], "quantization": first["quantization"],
               "lr": first["lr"], "runs_ok": len(good), "runs": len(group),
               "seeds": ",".join(str(int(s)) for s in sorted(good["seed"].dropna())),
               "statuses": ",".join(sorted(set(group["status"])))}
        for split in ("test", "val"):
            col = record.metric_key(split, metric)
            values, base = _by_seed(good, col, scale), _by_seed(full_runs, col, scale)
            row[f"{split}_mean"] = sum(values.values()) / len(values) if values else float("nan")
            row[f"{split}_ci95"] = ci95(list(values.values()))
            row[f"_{split}_by_seed"] = list(values.values())
            row[f"{split}_delta_ci95"] = delta_ci95(values, base) if first["method"] != "full" else 0.0
        for col, name in ((mem, "peak_mem_gb"), (record.PEAK_HOST_RSS_GB, "peak_host_rss_gb"),
                          (record.TRAIN_TIME_S, "train_time_s"),
                          (record.TRAINABLE_PCT, "trainable_pct"), (record.TRAINABLE_PARAMS, "trainable_params"),
                          (record.ADAPTER_MB, "adapter_mb"), (record.TOKENS_PER_S, "tokens_per_s"),
                          (record.WALL_TIME_S, "wall_time_s"), ("val_loss", "val_loss"),
                          (record.SETUP_TIME_S, "setup_time_s"), (record.EVAL_TIME_S, "eval_time_s")):
            row[name] = good[col].mean() if col in good and len(good) else float("nan")
        # A trial holds its device share (a GPU fraction, or one CPU slot) for its wall time.
        share = good["gpu_share"].where(good["gpu_share"] > 0, 1.0) if "gpu_share" in good else 1.0
        row["device_hours"] = float((good[record.WALL_TIME_S] * share).sum() / 3600) \
            if record.WALL_TIME_S in good and len(good) else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for split in ("test", "val"):
        table[f"{split}_ci95"] = pooled_ci95(table[f"_{split}_by_seed"], table["method"] != "base",
                                             table[f"{split}_ci95"])
    table = table.drop(columns=["_test_by_seed", "_val_by_seed"])
    # device-hours per run, so arms with different numbers of finished seeds compare fairly
    table["device_hours_per_run"] = table["device_hours"] / table["runs_ok"].where(table["runs_ok"] > 0)
    reference = full_ft_arm(trials, metric)
    base = table[table["arm"] == reference].iloc[0] if reference is not None else None
    untrained = table[table["method"] == "base"]
    nan = float("nan")
    for name in ("test", "val"):
        table[f"{name}_delta_pts"] = table[f"{name}_mean"] - (base[f"{name}_mean"] if base is not None else nan)
        table[f"{name}_vs_base_pts"] = table[f"{name}_mean"] - (untrained.iloc[0][f"{name}_mean"]
                                                                 if len(untrained) else nan)
    for name in ("peak_mem_gb", "train_time_s", "device_hours_per_run"):
        table[f"{name}_ratio"] = table[name] / base[name] if base is not None else nan
    sign = 1 if mode == "max" else -1  # the frontier keeps the better score at each cost
    for cost, suffix in (("peak_mem_gb", ""), ("train_time_s", "_time"), ("trainable_params", "_params")):
        table["pareto" + suffix] = pareto_mask([sign * v for v in table["test_mean"]], table[cost].tolist())
    # the baseline heads the table, the untouched base model closes it, the best arm first in between
    table["order"] = table["method"].map({"full": 0, "base": 2}).fillna(1)
    table = table.sort_values(["order", "test_mean"], ascending=[True, mode == "min"]).reset_index(drop=True)
    table = table.drop(columns="order")
    table.attrs["memory_metric"] = mem
    table.attrs["mode"] = mode
    return table


def with_verdicts(table: pd.DataFrame, decision) -> pd.DataFrame:
    """The arm table with each arm's paired intervals and verdicts (evaluation/verdicts.py) as columns."""
    per_arm = verdicts.columns(decision)
    for col in sorted({k for values in per_arm.values() for k in values}):
        table[col] = [per_arm.get(arm, {}).get(col) for arm in table["arm"]]
    return table


def pareto_mask(scores: list[float], costs: list[float]) -> list[bool]:
    """True where no other arm has a score at least as high and a cost at least as low (one strictly)."""
    out = []
    for i, (s, c) in enumerate(zip(scores, costs)):
        if s != s or c != c:
            out.append(False)
            continue
        dominated = any(j != i and s2 >= s and c2 <= c and (s2 > s or c2 < c)
                        for j, (s2, c2) in enumerate(zip(scores, costs)) if s2 == s2 and c2 == c2)
        out.append(not dominated)
    return out


def _fmt(x, digits=2) -> str:
    if isinstance(x, str):
        return x
    if x is None or x != x:
        return "–"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def _pm(mean, half) -> str:
    return _fmt(mean) + (f" ± {_fmt(half)}" if half == half else "")


def data_of(parent) -> str:
    """What a sweep was fitted on, as its report and model card say it: the task, and the data file or dataset
    (which need not be the task's own: a user's chat file through task=bbc_headlines)."""
    params = parent.data.params
    task = f"task `{params.get('task')}`"
    return f"{task}, data `{params['data_source']}` ({params.get('data_format')})" if "data_source" in params else task


def _interval(r, split: str, against: str) -> str:
    """`+0.40 [-1.10, +1.90]`: a paired difference and its 95 % interval, when the sweep has one."""
    low, high = r.get(f"{split}_{against}_low"), r.get(f"{split}_{against}_high")
    if low is None or low != low:
        return "–"
    return f"{r[f'{split}_{against}_mean']:+.2f} [{low:+.2f}, {high:+.2f}]"


def _verdict(r, split: str = "test", against: str = "vs_full") -> str:
    judged = r.get(f"{split}_{against}_verdict")
    if not isinstance(judged, str):
        return "–"
    settle = r.get(f"{split}_{against}_settle")
    return judged.replace("_", "-") + (f": {settle}" if isinstance(settle, str) else "")


def markdown(table: pd.DataFrame, trials: pd.DataFrame, metric: str, sweep_id: str,
             price_per_hour: float = 0.0, examples: pd.DataFrame | None = None, data: str | None = None,
             decision=None, racing: dict | None = None) -> str:
    mem = table.attrs.get("memory_metric", "peak memory")
    unit, delta_unit = (" %", "pts") if record.metric_scale(metric) == 100 else ("", "")
    with_base = "base" in set(table["method"])
    with_loss = "val_loss" in table and table["val_loss"].notna().any() and metric != "loss"
    seeds = sorted({int(s) for s in trials["seed"].dropna()})
    # on CPU the whole process's figure goes beside the part the method controls
    beside = mem in (record.PEAK_RSS_ABOVE_BASELINE_GB, record.PEAK_TENSOR_MEMORY_GB)
    what = ("the model's tensors by their bytes plus the most the C heap held above them at once (gradients, "
            "optimizer state, activations), sampled after every forward, backward, optimizer step and evaluation "
            "batch" if mem == record.PEAK_TENSOR_MEMORY_GB else
            "the trial's RSS peak above the process's RSS just before the model loaded (weights, gradients, "
            "optimizer state, activations, and freed pages the allocator kept)")
    note = (f" Memory is `{mem}`: {what}; the part the method controls. `{record.PEAK_HOST_RSS_GB}` beside it is "
            "the whole process's (interpreter and libraries included)." if beside else f" Memory is `{mem}`.")
    better = "higher" if record.metric_mode(metric) == "max" else "lower"
    paired_ = decision is not None and bool(decision.vs_full.get("test"))
    opening = [f"**{verdicts.sentence(decision, table)}**", ""] if decision is not None else []
    lines = [f"## peftsweep report — {sweep_id}", "", *opening, *([f"Fitted on {data}.", ""] if data else []),
             *racing_lines(racing),
             f"Test {metric}{unit or ''} ({better} is better), mean ± 95 % CI over seeds {seeds} (seed spread "
             "pooled over the arms); Δ is against the "
             + (f"full fine-tuning arm `{decision.full_arm}`, with its 95 % interval paired over the same "
                f"{decision.split_rows.get('test', 0):,} test rows (and over seeds where several ran), and the "
                f"verdict against a margin of ±{decision.margin:g} {delta_unit or metric}"
                if paired_ else "full fine-tuning arm (paired by seed)")
             + ("; vs base is against the untouched base model (no training)" if with_base else "")
             + f".{note} ★ marks the Pareto frontier of {metric} vs memory.", "",
             f"| arm | runs ok | test {metric}{unit} | Δ vs full FT {f'({delta_unit})' if delta_unit else ''} | "
             + ("verdict vs full FT | " if paired_ else "")
             + (f"vs base {f'({delta_unit})' if delta_unit else ''} | " if with_base else "")
             + f"val {metric}{unit} | " + ("val loss | " if with_loss else "") + f"{mem} | × full | "
             + (f"{record.PEAK_HOST_RSS_GB} | " if beside else "")
             + "train s | × full | setup s | eval s | device-h | × full | cost | trainable % | trainable params | "
             "adapter MB | ★ |",
             "|" + "---|" * (18 + beside + with_base + with_loss + paired_)]
    for _, r in table.iterrows():
        cost = f"{r['device_hours'] * price_per_hour:.2f}" if price_per_hour else "–"
        lines.append("| " + " | ".join([
            r["arm"], f"{r['runs_ok']}/{r['runs']}", _pm(r["test_mean"], r["test_ci95"]),
            (_interval(r, "test", "vs_full") if paired_ else _pm(r["test_delta_pts"], r["test_delta_ci95"]))
            if r["method"] != "full" else "0 (baseline)",
            *([_verdict(r) if r["method"] != "full" else "–"] if paired_ else []),
            *([(_interval(r, "test", "vs_base") if paired_ else _fmt(r["test_vs_base_pts"]))
               if r["method"] != "base" else "0 (base)"] if with_base else []),
            _pm(r["val_mean"], r["val_ci95"]), *([_fmt(r["val_loss"], 3)] if with_loss else []),
            _fmt(r["peak_mem_gb"]), _fmt(r["peak_mem_gb_ratio"]),
            *([_fmt(r["peak_host_rss_gb"])] if beside else []),
            _fmt(r["train_time_s"], 1), _fmt(r["train_time_s_ratio"]), _fmt(r["setup_time_s"], 1),
            _fmt(r["eval_time_s"], 1), _fmt(r["device_hours"], 3),
            _fmt(r["device_hours_per_run_ratio"]), cost, _fmt(r["trainable_pct"], 3),
            _fmt(float(r["trainable_params"])), _fmt(r["adapter_mb"]), "★" if r["pareto"] else ""]) + " |")
    if "full" not in set(table["method"]):
        lines += ["", "This sweep has no full fine-tuning arm that finished: deltas and ratios are blank."]
    if decision is not None:
        lines += decision_lines(decision, metric, delta_unit)
    if examples is not None and len(examples):
        lines += example_lines(examples, table)
    bad = trials[trials["status"] != "ok"]
    if len(bad):
        lines += ["", f"### Runs that did not finish ok ({len(bad)} of {len(trials)})", "",
                  "| arm | seed | status | detail |", "|---|---|---|---|"]
        for _, r in bad.iterrows():
            detail = r.get("error") or ""
            if r["status"] == "pruned" and r.get("pruned_at_step"):
                detail = f"stopped by the scheduler at step {r['pruned_at_step']}"
            seed = "–" if r["seed"] != r["seed"] else int(r["seed"])
            lines.append(f"| {r['arm']} | {seed} | {r['status']} | "
                         f"{str(detail).splitlines()[0][:160].replace('|', '/') if detail else ''} |")
    return "\n".join(lines) + "\n"


def html(md: str, images: list[Path], sweep_id: str) -> str:
    """The Markdown's tables and text as one self-contained page (images inlined)."""
    parts, table = [], []

    def flush():
        if table:
            cells = [[html_lib.escape(c.strip()) for c in ln.strip().strip("|").split("|")] for ln in table]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
            table.clear()

    for ln in md.splitlines():
        if ln.startswith("|"):
            if not ln.startswith("|---"):
                table.append(ln)
            continue
        flush()
        if ln.startswith("## "):
            parts.append(f"<h1>{html_lib.escape(ln[3:])}</h1>")
        elif ln.startswith("### "):
            parts.append(f"<h2>{html_lib.escape(ln[4:])}</h2>")
        elif ln.startswith("**"):
            head, _, rest = ln[2:].partition("**")
            parts.append(f"<p><b>{html_lib.escape(head)}</b>{html_lib.escape(rest)}</p>")
        elif ln.strip():
            parts.append(f"<p>{html_lib.escape(ln)}</p>")
    flush()
    for img in images:
        data = base64.b64encode(img.read_bytes()).decode()
        parts.append(f"<p><img alt='{img.stem}' src='data:image/png;base64,{data}'></p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>peftsweep {html_lib.escape(sweep_id)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            f"img{{max-width:100%}}</style></head><body>{''.join(parts)}</body></html>")


def build_report(client, experiment: str, sweep_id: str | None = None, metric: str = "accuracy",
                 out_dir: str = "reports", log_to_mlflow: bool = True, price_per_hour: float = 0.0,
                 margin: float = 1.0) -> dict:
    """`margin`: how far from full FT still counts as close enough, in points (the metric's own units for a
    loss); the verdicts read the paired intervals against it."""
    parent = find_parent(client, experiment, sweep_id)
    sweep = parent.data.tags.get(record.SWEEP_ID, parent.info.run_name)
    trials = trial_table(client, parent)
    if trials.empty:
        raise LookupError(f"sweep {sweep} has no trial runs")
    metric = sweep_metric(parent, trials, metric)
    table = arm_table(trials, metric)
    decision = verdicts.decide(client, trials, metric, margin)
    table = with_verdicts(table, decision)
    out = Path(out_dir) / sweep
    out.mkdir(parents=True, exist_ok=True)
    examples = examples_for(client, trials) if trials.get("task_type", pd.Series(dtype=str)).eq("sft").any() else None
    racing = racing_spent(parent, trials)
    md = markdown(table, trials, metric, sweep, price_per_hour, examples, data_of(parent), decision, racing)
    (out / "report.md").write_text(md)
    images = [plots.pareto_png(table, metric, out / "pareto.png")]
    heat = plots.rank_modules_heatmap(table, metric, out / "heatmap_rank_modules.png")
    images += [heat] if heat else []
    (out / "report.html").write_text(html(md, images, sweep))
    payload = {"sweep_id": sweep, "parent_run_id": parent.info.run_id, "metric": metric,
               "task": parent.data.params.get("task"), "data_source": parent.data.params.get("data_source"),
               "memory_metric": table.attrs.get("memory_metric"), "price_per_hour": price_per_hour,
               "margin": margin, "answer": verdicts.sentence(decision, table), "full_ft_arm": decision.full_arm,
               "best_val_arm": decision.best.get("val"), "val_tie_set": decision.ties.get("val", []),
               "val_shippable": decision.shippable.get("val", []),
               "seed_noise": {k: vars(v) for k, v in decision.seed_noise.items()},
               "rows_compared": decision.split_rows, "not_compared": decision.notes, "racing": racing,
               "arms": json.loads(table.to_json(orient="records")),
               "trials": json.loads(trials.to_json(orient="records"))}
    (out / "report.json").write_text(json.dumps(payload, indent=1))
    if log_to_mlflow:
        client.log_artifacts(parent.info.run_id, str(out), "report")
        verdicts.log_to_runs(client, trials, decision)
    return {"sweep_id": sweep, "parent_run_id": parent.info.run_id, "dir": str(out), "markdown": md,
            "table": table, "trials": trials, "json": payload, "decision": decision}
