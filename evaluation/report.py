"""`peftsweep report`: every arm of a sweep against its full fine-tuning arm, from MLflow alone.

Per arm (runs sharing a configuration, over seeds): mean and 95 % CI of the task metric, the delta to
full FT in points, peak memory / train time and their ratios to full FT, trainable %, adapter MB; the
Pareto frontier of metric vs peak memory. Written as Markdown, HTML (self-contained), PNG and JSON and
logged to the sweep's parent run under `report/`.
"""
from __future__ import annotations

import base64
import json
import math
import tempfile
from pathlib import Path

import pandas as pd

from evaluation.runs import find_parent, trial_table
from trainers import record

# Two-sided 95 % Student t quantiles by degrees of freedom; 1.96 beyond the table.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def ci95(values) -> float:
    """Half-width of the 95 % confidence interval of the mean; nan with fewer than two values."""
    values = [v for v in values if v == v]
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T95.get(n - 1) or next((_T95[k] for k in sorted(_T95) if k >= n - 1), 1.96)
    return t * sd / math.sqrt(n)


def memory_column(trials: pd.DataFrame) -> str:
    """VRAM when the trials ran on GPUs, host RSS otherwise: one memory figure compared everywhere."""
    col = record.PEAK_VRAM_RESERVED_GB
    return col if col in trials and trials[col].notna().any() else record.PEAK_HOST_RSS_GB


def arm_table(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per arm; `metric` is the bare task metric name (accuracy)."""
    test, val = record.metric_key("test", metric), record.metric_key("val", metric)
    mem = memory_column(trials)
    ok = trials[trials["status"] == "ok"]
    rows = []
    for arm, group in trials.groupby("arm", sort=False):
        good = ok[ok["arm"] == arm]
        first = group.iloc[0]
        row = {"arm": arm, "method": first["method"], "r": first["r"], "alpha": first["alpha"],
               "target_modules": first["target_modules"], "quantization": first["quantization"],
               "lr": first["lr"], "runs_ok": len(good), "runs": len(group),
               "statuses": ",".join(sorted(set(group["status"])))}
        for col, name in ((test, "test"), (val, "val")):
            vals = list(good[col]) if col in good else []
            row[f"{name}_mean"] = 100 * sum(vals) / len(vals) if vals else float("nan")
            row[f"{name}_ci95"] = 100 * ci95(vals)
        for col, name in ((mem, "peak_mem_gb"), (record.TRAIN_TIME_S, "train_time_s"),
                          (record.TRAINABLE_PCT, "trainable_pct"), (record.TRAINABLE_PARAMS, "trainable_params"),
                          (record.ADAPTER_MB, "adapter_mb"), (record.TOKENS_PER_S, "tokens_per_s"),
                          (record.WALL_TIME_S, "wall_time_s")):
            row[name] = good[col].mean() if col in good and len(good) else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    full = table[table["method"] == "full"]
    base = full.iloc[0] if len(full) else None
    for name in ("test", "val"):
        table[f"{name}_delta_pts"] = table[f"{name}_mean"] - (base[f"{name}_mean"] if base is not None else float("nan"))
    for name in ("peak_mem_gb", "train_time_s"):
        table[f"{name}_ratio"] = table[name] / base[name] if base is not None else float("nan")
    # One trial holds one device (GPU, or CPU slot) for its wall time: the basis of device-hours and cost.
    table["device_hours"] = table["wall_time_s"] * table["runs_ok"] / 3600
    table["pareto"] = pareto_mask(table["test_mean"].tolist(), table["peak_mem_gb"].tolist())
    table.attrs["memory_metric"] = mem
    table["is_full"] = table["method"] == "full"  # the baseline heads the table
    table = table.sort_values(["is_full", "test_mean"], ascending=[False, False]).reset_index(drop=True)
    table.attrs["memory_metric"] = mem
    return table.drop(columns="is_full")


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
    if isinstance(x, (int,)) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def markdown(table: pd.DataFrame, metric: str, sweep_id: str, price_per_hour: float = 0.0) -> str:
    mem = table.attrs.get("memory_metric", "peak memory")
    head = (f"| arm | runs ok | test {metric} % (±95% CI) | Δ vs full FT (pts) | val {metric} % | "
            f"{mem} | × full | train s | × full | trainable % | trainable params | adapter MB | device-h | "
            f"cost | Pareto |")
    lines = [f"## peftsweep report — {sweep_id}", "", head, "|" + "---|" * 15]
    for _, r in table.iterrows():
        ci = f" ± {_fmt(r['test_ci95'])}" if r["test_ci95"] == r["test_ci95"] else ""
        lines.append("| " + " | ".join([
            r["arm"], f"{r['runs_ok']}/{r['runs']}", _fmt(r["test_mean"]) + ci, _fmt(r["test_delta_pts"]),
            _fmt(r["val_mean"]), _fmt(r["peak_mem_gb"]), _fmt(r["peak_mem_gb_ratio"]), _fmt(r["train_time_s"], 1),
            _fmt(r["train_time_s_ratio"]), _fmt(r["trainable_pct"], 3), _fmt(float(r["trainable_params"])),
            _fmt(r["adapter_mb"]), _fmt(r["device_hours"], 3),
            f"{r['device_hours'] * price_per_hour:.2f}" if price_per_hour else "–",
            "★" if r["pareto"] else ""]) + " |")
    failed = table[table["runs_ok"] < table["runs"]]
    if len(failed):
        lines += ["", "Arms with runs that did not finish ok: " +
                  "; ".join(f"{r['arm']} ({r['statuses']})" for _, r in failed.iterrows())]
    return "\n".join(lines) + "\n"


def pareto_png(table: pd.DataFrame, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for _, r in table.iterrows():
        color = "black" if r["method"] == "full" else ("tab:red" if r["pareto"] else "tab:blue")
        ax.scatter(r["peak_mem_gb"], r["test_mean"], color=color, s=40)
        ax.annotate(r["arm"], (r["peak_mem_gb"], r["test_mean"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    front = table[table["pareto"]].sort_values("peak_mem_gb")
    ax.plot(front["peak_mem_gb"], front["test_mean"], color="tab:red", lw=1, label="Pareto frontier")
    ax.set_xlabel(table.attrs.get("memory_metric", "peak memory (GB)"))
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title("metric vs peak memory (black: full fine-tuning)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def html(md_table: str, png: Path, sweep_id: str) -> str:
    rows = [ln for ln in md_table.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    img = base64.b64encode(png.read_bytes()).decode()
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>peftsweep {sweep_id}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            f"</style></head><body><h1>peftsweep report — {sweep_id}</h1><table><tr>{head}</tr>{body}</table>"
            f"<p><img alt='Pareto plot' src='data:image/png;base64,{img}'></p></body></html>")


def build_report(client, experiment: str, sweep_id: str | None = None, metric: str = "accuracy",
                 out_dir: str = "reports", log_to_mlflow: bool = True, price_per_hour: float = 0.0) -> dict:
    parent = find_parent(client, experiment, sweep_id)
    sweep = parent.data.tags.get(record.SWEEP_ID, parent.info.run_name)
    trials = trial_table(client, parent)
    if trials.empty:
        raise LookupError(f"sweep {sweep} has no trial runs")
    table = arm_table(trials, metric)
    out = Path(out_dir) / sweep
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(table, metric, sweep, price_per_hour)
    (out / "report.md").write_text(md)
    pareto_png(table, metric, out / "pareto.png")
    (out / "report.html").write_text(html(md, out / "pareto.png", sweep))
    (out / "report.json").write_text(json.dumps({"sweep_id": sweep, "metric": metric,
                                                 "arms": json.loads(table.to_json(orient="records")),
                                                 "trials": json.loads(trials.to_json(orient="records"))}, indent=1))
    if log_to_mlflow:
        client.log_artifacts(parent.info.run_id, str(out), "report")
    return {"sweep_id": sweep, "parent_run_id": parent.info.run_id, "dir": str(out), "markdown": md,
            "table": table, "trials": trials}
