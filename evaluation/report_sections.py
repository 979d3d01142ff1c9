"""The report's sections beside the arm table: what seed racing spent, which arms the best cannot be told from
(the validation tie set promotion picks among, and how seeds entered its intervals), and, for sft, what each
arm writes on a few fixed validation rows."""
from __future__ import annotations

import pandas as pd

from trainers import record


def racing_lines(spent: dict | None) -> list[str]:
    if not spent:
        return []
    grid = f" of the {spent['grid_trials']} that {spent['max_seeds']} seeds an arm would" if spent["grid_trials"] \
        else ""
    by_count: dict = {}
    for arm, seeds in spent["seeds"].items():
        by_count.setdefault(len(seeds), []).append(arm)
    shown = "; ".join(f"{n} seed{'s' if n != 1 else ''}: {', '.join(sorted(arms))}"
                      for n, arms in sorted(by_count.items(), reverse=True))
    return [f"Seed racing ran {spent['trials']} trials{grid}, adding seeds only where the decision stayed open "
            f"({shown}).", ""]


def decision_lines(decision, metric: str, unit: str) -> list[str]:
    """The validation tie set (what promotion picks among) and why some arms have no interval."""
    lines = []
    val = decision.vs_best.get("val", {})
    if decision.best.get("val"):
        tied, shippable = decision.ties.get("val", []), decision.shippable.get("val", [])
        lines += ["", f"### Which arms the best cannot be told from (validation, {decision.split_rows.get('val', 0):,} "
                      "rows)", "",
                  f"Best adapter arm on validation: `{decision.best['val']}`. "
                  + (f"{len(tied)} arms tie with it within noise (their paired 95 % interval of the difference "
                     f"includes 0): {', '.join(f'`{a}`' for a in tied)}. Promotion's `best` rule ships the cheapest "
                     f"of those shown within the margin ({decision.margin:g}) of it: "
                     f"{', '.join(f'`{a}`' for a in shippable)}."
                     if len(tied) > 1 else "No other adapter arm ties with it.") + " " + noise_line(decision), "",
                  f"| arm | Δ vs best on validation ({unit or metric}) | tied |", "|---|---|---|"]
        for arm, c in sorted(val.items(), key=lambda kv: -kv[1].mean):
            if arm not in decision.adapters:
                continue  # full FT and the base arm are references, not candidates
            lines.append(f"| {arm} | {c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}] | {'yes' if arm in tied else 'no'} |")
    if decision.notes:
        lines += ["", "Not compared row by row: " + "; ".join(decision.notes) + "."]
    return lines


def noise_line(decision) -> str:
    noise = decision.seed_noise.get("val")
    if noise is None or noise.source == "none":
        return ("One seed an arm: these intervals count the rows only and hold for these seeds alone (seed racing, "
                "search.racing, measures what seeds add).")
    unit = " points" if record.metric_scale(decision.metric) == 100 else ""
    return (f"Seeds counted: one seed moves a difference between two arms by about {noise.sd:.2f}{unit} "
            f"({noise.source} over the sweep's arms, {noise.df:g} df).")


EXAMPLES = 3  # fixed validation rows (ids 0..2) shown across every arm


def example_lines(examples: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """The same validation rows as every arm answered them: the reference, full FT, then each other arm."""
    def cell(text) -> str:
        text = " ".join(str(text).split())
        return (text[:240] + "…" if len(text) > 240 else text).replace("|", "/")

    lines = ["", f"### What each arm writes ({EXAMPLES} fixed validation rows, greedy decoding)"]
    order = list(table["arm"])
    for row_id in sorted(set(examples["id"]))[:EXAMPLES]:
        rows = examples[examples["id"] == row_id]
        first = rows.iloc[0]
        lines += ["", f"**Example {int(row_id)}.** Prompt: {cell(first['prompt'])}", "",
                  "| answer by | text |", "|---|---|", f"| reference | {cell(first['reference'])} |"]
        for arm in sorted(set(rows["arm"]), key=lambda a: order.index(a) if a in order else len(order)):
            lines.append(f"| {arm} | {cell(rows[rows['arm'] == arm].iloc[0]['generation'])} |")
    return lines


def examples_for(client, trials: pd.DataFrame) -> pd.DataFrame:
    """The generations table of one finished run per arm (its lowest seed), with an `arm` column."""
    from trainers.tracking import load_table

    ok = trials[trials["status"] == "ok"].sort_values("seed")
    if ok.empty:
        return pd.DataFrame()
    first = ok.groupby("arm", sort=False).head(1)
    experiment = client.get_run(first.iloc[0]["run_id"]).info.experiment_id
    table = load_table(client, experiment, list(first["run_id"]))
    if table.empty:
        return table
    return table.merge(first[["run_id", "arm"]], on="run_id")
