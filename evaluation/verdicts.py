"""The sweep's answer with its uncertainty: is each adapter arm within a margin of full fine-tuning, and which arms
does the best one not beat beyond noise?

Every arm is scored on the same validation and test rows (one split seed), so arms are compared row by row
(evaluation/paired.py): each arm's per-row scores (trainers.tracking.load_row_scores) are lined up by row id,
over all its finished seeds. Runs scored on other rows (their `row_ids_hash_<split>` differs from the sweep's
usual one) or without row scores (recorded before they existed) are left out of the comparison, and the note
says so. A metric that is not a mean over rows (corpus chrF and BLEU) is compared by sacrebleu's paired
bootstrap; the answers' loss and perplexity have no per-row score, so they get no interval and no verdict.

Differences and bounds are in the report's units: points for a fraction metric (x100), the metric's own for a
loss. `verdict` reads `paired.verdict` against `margin` in those units.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from evaluation import paired
from evaluation.runs import full_ft_arm
from trainers import record
from trainers.tracking import load_row_scores

ADAPTER_METHODS_EXCLUDED = ("full", "base")  # the reference arms: what the adapters are judged against
CORPUS_METRICS = ("chrf", "bleu")  # corpus statistics, not means over rows


@dataclass
class Comparison:
    """arm - reference on one split: mean and interval in report units, the verdict against the margin, and
    about how many rows (one seed an arm) or seeds an arm (several) would settle an undecided one."""
    arm: str
    reference: str
    mean: float
    low: float
    high: float
    verdict: str
    pairing: str
    settle: Optional[str] = None
    # undecided only: about how many seeds an arm would decide it. Seed noise counted: seeds that decide it at
    # paired.POWER; rows alone (one seed an arm): rows needed / rows there, k seeds at best acting as k times the
    # rows. None when no number decides it. Seed racing spends a seed only where this is within search.max_seeds.
    seeds_to_decide: Optional[float] = None


@dataclass(frozen=True)
class SeedNoise:
    """Where the seed part of a split's intervals came from: "measured" (arms run at two or more seeds, pooled
    over the sweep: `df` degrees of freedom), "presumed" (nothing measured yet: PRESUMED_SEED_SD, which only
    seed racing uses, to decide where a second seed is worth its cost) or "none" (one seed an arm: intervals
    count rows only and hold for these seeds alone). `sd`: the seed part of one seed's difference between two
    arms, in report units."""
    source: str
    sd: Optional[float] = None
    df: Optional[float] = None


@dataclass
class Decision:
    """Everything the report and promotion read: comparisons of every arm against full FT, the base arm and
    the best adapter arm, on test (what is reported) and validation (what picks), the validation tie set."""
    metric: str
    margin: float
    split_rows: dict = field(default_factory=dict)  # split -> number of rows compared
    vs_full: dict = field(default_factory=dict)  # split -> {arm: Comparison}
    vs_base: dict = field(default_factory=dict)
    vs_best: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)  # split -> the best adapter arm on that split
    ties: dict = field(default_factory=dict)  # split -> [arms tied with the best]
    shippable: dict = field(default_factory=dict)  # split -> [the best, and tied arms shown within the margin of it]
    seed_noise: dict = field(default_factory=dict)  # split -> how seed noise entered the intervals (SeedNoise)
    full_arm: Optional[str] = None
    adapters: list = field(default_factory=list)  # the adapter arms compared (the tie set is drawn from them)
    notes: list = field(default_factory=list)


def arm_rows(client, trials: pd.DataFrame, split: str, column: str = record.ROW_SCORE, dtype=float,
             loaded: Optional[dict] = None):
    """({arm: [n_seeds, n_rows] array}, {arm: [seeds]}, row ids, notes) of the runs that finished ok, lined
    up by row id; only runs whose row-id hash is the sweep's most common one are paired. `loaded`: frames
    already read, by (run id, split), filled as it reads (one download a run and split however many columns
    and references are compared)."""
    loaded = {} if loaded is None else loaded
    ok = trials[trials["status"] == "ok"]
    hash_col = record.row_ids_hash_param(split)
    notes = []
    if hash_col not in ok or ok[hash_col].isna().all():
        return {}, {}, [], [f"no run of this sweep logged per-row {split} scores (recorded before they existed)"]
    usual = ok[hash_col].mode().iloc[0]
    other = ok[ok[hash_col] != usual]
    if len(other):
        notes.append(f"{len(other)} run(s) scored other {split} rows (another split or data) and are not paired: "
                     + ", ".join(sorted(set(other["arm"]))))
    frames, arms, seeds = [], [], []
    for _, run in ok[ok[hash_col] == usual].iterrows():
        try:
            key = (run["run_id"], split)
            if key not in loaded:
                loaded[key] = load_row_scores(client, run["run_id"], split)
            frames.append(loaded[key])
        except LookupError as exc:
            notes.append(str(exc))
            continue
        arms.append(run["arm"])
        seeds.append(int(run["seed"]))
    if not frames:
        return {}, {}, [], notes
    ids, matrix = paired.row_matrix(frames, column, dtype=dtype)
    by_arm, arm_seeds = {}, {}
    for i, arm in enumerate(arms):
        by_arm.setdefault(arm, []).append(matrix[i])
        arm_seeds.setdefault(arm, []).append(seeds[i])
    return {a: np.vstack(rows) for a, rows in by_arm.items()}, arm_seeds, ids, notes


def _settle(diff: paired.PairedDiff, margin: float, mode: str, scale: float, arms: int = 1,
            seed_df: Optional[float] = None, seed_share: float = 1.0) -> tuple[str, Optional[float]]:
    """About what would decide an undecided comparison, and the seeds an arm that would
    (Comparison.seeds_to_decide): with one seed an arm and rows alone counted, the rows an interval around
    the same mean needs; else the seeds an arm that decide it at paired.POWER (paired.seeds_to_decide).
    `arms`: how many arms pool their seed noise, `seed_df`: what it rests on now (measured only),
    `seed_share`: its part of the interval's variance."""
    one_seed = diff.n_seeds == (1, 1) and "pooled" not in diff.method  # pooled: seed noise counts, seeds settle
    if one_seed:
        needed = paired.rows_to_decide(diff.se, diff.mean, margin / scale, diff.n_rows, mode=mode)
        if needed is None:
            return "no number of rows decides it (the difference sits on the margin)", None
        return f"about {needed:,} rows (now {diff.n_rows:,})", needed / diff.n_rows
    n = min(diff.n_seeds)
    needed = paired.seeds_to_decide(diff.se, diff.mean, margin / scale, n, arms, seed_share=seed_share,
                                    seed_df=seed_df or 0.0, mode=mode)
    if needed is None:
        return "no number of seeds decides it (the difference sits on the margin)", None
    return f"about {needed:,} seeds an arm (now {n:,})", float(needed)


def pooled_against(rows: dict, seeds: dict, reference: str) -> Optional[tuple]:
    """The seed noise of every arm's difference from `reference` at the seeds both ran, pooled
    (paired.pooled_seed_noise); None while no arm shares two seeds with it."""
    tables = []
    for arm, x in rows.items():
        if arm != reference and arm in seeds and reference in seeds:
            index_a, index_b = paired.common_seeds(seeds[arm], seeds[reference])
            tables.append(x[index_a] - rows[reference][index_b])
    return paired.pooled_seed_noise(tables)


def sweep_seed_noise(rows: dict, seeds: dict, prefer: Optional[str], n_rows: int, scale: float,
                     presumed_sd: Optional[float] = None) -> tuple[Optional[tuple], SeedNoise]:
    """The seed noise of one arm's difference from another, for every comparison of the split: pooled over
    every arm's difference from `prefer` (full FT) at the seeds both ran, or from the arm with the most seeds
    when full FT has one. Seeds move arms of one model, task and data alike, so a difference's seed noise is
    one figure for the sweep (conservative against the base arm, which has none of its own), and every arm,
    the best adapter too, is judged with the degrees of freedom all raced arms give, not the one or two of
    its own pair. `presumed_sd` (report units) stands in while nothing is measured: (pooled tuple for
    paired_diff_ci, SeedNoise)."""
    for reference in [prefer] + sorted((a for a in rows if a != prefer), key=lambda a: -len(seeds.get(a, []))):
        pooled = pooled_against(rows, seeds, reference) if reference in rows else None
        if pooled is not None:
            ms_seeds, df, _, _ = pooled
            return pooled, SeedNoise("measured", scale * math.sqrt(ms_seeds / n_rows), df)
    if presumed_sd is None:
        return None, SeedNoise("none")
    # a seed mean square with no interaction part: one seed's difference moves by presumed_sd on top of the rows'
    seed_ms = n_rows * (presumed_sd / scale) ** 2
    return (seed_ms, PRESUMED_SEED_DF, 0.0, PRESUMED_SEED_DF), SeedNoise("presumed", presumed_sd, PRESUMED_SEED_DF)


def _projection_terms(diff: paired.PairedDiff, pooled: Optional[tuple], presumed: bool, n_arms: int) -> dict:
    """What a seed projection needs of a comparison: every other arm pools its seed noise (an upper bound on
    the degrees of freedom the race reaches: it skips decided arms); what is measured now, and the seed part
    of the interval's variance (all of it for independent seeds, whose t interval already weighs both)."""
    if pooled is None:
        return {"arms": n_arms - 1, "seed_df": diff.df}
    seed_var = max(pooled[0] - pooled[2], 0.0) / (min(diff.n_seeds) * diff.n_rows)
    return {"arms": n_arms - 1, "seed_df": None if presumed else pooled[1],
            "seed_share": min(1.0, seed_var / diff.se ** 2) if diff.se > 0 else 1.0}


def _compare(rows: dict, seeds: dict, reference: str, margin: float, mode: str, scale: float,
             pooled: Optional[tuple] = None, presumed: bool = False) -> dict:
    out = {}
    for arm, diff in paired.compare_to(rows, reference, seeds=seeds, pooled=pooled).items():
        judged = paired.verdict(diff.low * scale, diff.high * scale, margin, mode)
        terms = _projection_terms(diff, pooled, presumed, len(rows))
        settle, seeds_needed = _settle(diff, margin, mode, scale, **terms) if judged == "undecided" else (None, None)
        pairing = diff.pairing.replace("pooled over the sweep's arms", "presumed") if presumed else diff.pairing
        out[arm] = Comparison(arm, reference, diff.mean * scale, diff.low * scale, diff.high * scale, judged,
                              pairing, settle, seeds_needed)
    return out


def _compare_corpus(client, trials, split: str, reference: str, metric: str, margin: float, mode: str,
                    loaded: dict) -> dict:
    """chrF / BLEU: sacrebleu's paired bootstrap over the generations of the rows both arms answered (the
    seeds of an arm pooled as one corpus, matched seed by seed with the reference's)."""
    gens, _, _, _ = arm_rows(client, trials, split, "generation", dtype=object, loaded=loaded)
    refs, _, _, _ = arm_rows(client, trials, split, "reference", dtype=object, loaded=loaded)
    if reference not in gens:
        return {}
    out = {}
    for arm in gens:
        if arm == reference:
            continue
        k = min(len(gens[arm]), len(gens[reference]))
        diff = paired.paired_corpus_diff(list(gens[reference][:k].ravel()), {arm: list(gens[arm][:k].ravel())},
                                         list(refs[reference][:k].ravel()), metric=metric)[arm]
        out[arm] = Comparison(arm, reference, diff.mean, diff.low, diff.high,
                              paired.verdict(diff.low, diff.high, margin, mode), "rows (corpus bootstrap)")
    return out


def tied_with_best(best: str, vs_best: dict, candidates: list) -> list:
    """The best arm and every candidate the data cannot tell from it: the interval of candidate - best, rows
    and (once measured) seeds counted, holds 0. No cut on the point estimate: which arm leads by a point
    is what a rerun changes (three reruns of the default sweep put three different arms on top), and a cut
    on it moved arms in and out of the tie set with every seed."""
    return [best] + [a for a in candidates if a != best and a in vs_best
                     and vs_best[a].low <= 0 <= vs_best[a].high]


def shown_within(best: str, vs_best: dict, tied: list) -> list:
    """The best arm and the tied arms shown within the margin of it (the interval of arm - best clear of
    -margin: equivalent, non-inferior or better). Promotion ships the cheapest of these: a tied arm the data
    cannot place within the margin may be the one a rerun finds several points behind, and "the cheapest of
    the tie set" shipped exactly that (3.95 points below full FT on test, at 500 rows)."""
    return [best] + [a for a in tied if a != best and vs_best[a].verdict in ("equivalent", "non_inferior", "better")]


def decide(client, trials: pd.DataFrame, metric: str, margin: float,
           presumed_seed_sd: Optional[float] = None) -> Decision:
    """Every adapter arm against full FT, the base arm and the best adapter arm, on test and validation.
    `presumed_seed_sd` (report units): the seed noise to count while no arm has run two seeds (racing's
    first round); the report passes none, and its one-seed intervals say they count rows only."""
    scale, mode = record.metric_scale(metric), record.metric_mode(metric)
    decision = Decision(metric, margin)
    if metric in ("loss", "perplexity"):
        decision.notes.append(f"{metric} is scored over the encoded split, not per row: no paired interval")
        return decision
    methods = trials.groupby("arm")["method"].first()
    decision.full_arm = full_ft_arm(trials, metric)  # the same baseline as the arm table's deltas
    loaded: dict = {}
    for split in ("test", "val"):
        # corpus metrics: their sentence-level scores rank the arms; the comparisons are corpus-level
        column = metric if metric in CORPUS_METRICS else record.ROW_SCORE
        rows, seeds, ids, notes = arm_rows(client, trials, split, column, loaded=loaded)
        decision.notes += [f"{split}: {n}" for n in notes]
        if not rows:
            continue
        decision.split_rows[split] = len(ids)
        means = {a: float(np.nanmean(r)) for a, r in rows.items()}
        sign = 1 if mode == "max" else -1
        adapters = [a for a in rows if methods.get(a) not in ADAPTER_METHODS_EXCLUDED]
        decision.adapters = sorted(set(decision.adapters) | set(adapters))
        bases = [a for a in rows if methods.get(a) == "base"]
        pooled, decision.seed_noise[split] = (None, SeedNoise("none")) if metric in CORPUS_METRICS else \
            sweep_seed_noise(rows, seeds, decision.full_arm, len(ids), scale, presumed_seed_sd)
        presumed = decision.seed_noise[split].source == "presumed"
        pick = (lambda refs: _compare_corpus(client, trials, split, refs, metric, margin, mode, loaded)) \
            if metric in CORPUS_METRICS else (lambda refs: _compare(rows, seeds, refs, margin, mode, scale, pooled,
                                                                    presumed))
        if decision.full_arm in rows:
            decision.vs_full[split] = pick(decision.full_arm)
        if bases:
            decision.vs_base[split] = pick(bases[0])
        if adapters:
            best = max(adapters, key=lambda a: sign * means[a])
            decision.best[split] = best
            decision.vs_best[split] = pick(best)
            decision.ties[split] = tied_with_best(best, decision.vs_best[split], adapters)
            decision.shippable[split] = shown_within(best, decision.vs_best[split], decision.ties[split])
    return decision


def sentence(decision: Decision, table: pd.DataFrame) -> str:
    """The report's opening line: how many adapter arms are within the margin of full FT on test, and the
    cheapest of them by memory."""
    unit = "point" if record.metric_scale(decision.metric) == 100 else decision.metric
    plural = "s" if decision.margin != 1 else ""
    tests = decision.vs_full.get("test", {})
    adapters = table[~table["method"].isin(ADAPTER_METHODS_EXCLUDED)]
    if not tests:
        why = "no full fine-tuning arm finished" if decision.full_arm is None else "no per-row test scores"
        return f"No verdict against full fine-tuning: {why}."
    within = [a for a in adapters["arm"] if a in tests and tests[a].verdict in ("equivalent", "better",
                                                                                 "non_inferior")]
    open_ = [a for a in adapters["arm"] if a in tests and tests[a].verdict == "undecided"]
    head = (f"{len(within)} of {len(adapters)} adapter arms are within {decision.margin:g} {unit}{plural} of full "
            f"fine-tuning on test (95 % interval clear of -{decision.margin:g})")
    if within:
        cheap = adapters[adapters["arm"].isin(within)].sort_values(["peak_mem_gb", "trainable_params"]).iloc[0]
        ratio = cheap.get("peak_mem_gb_ratio")
        head += f"; the cheapest of them, {cheap['arm']}, holds {ratio:.2f}x full FT's memory" \
            if ratio == ratio and ratio is not None else f"; the cheapest of them is {cheap['arm']}"
    if open_:
        head += f"; {len(open_)} undecided (more rows or seeds would settle them)"
    return head + "."


def columns(decision: Decision) -> dict[str, dict]:
    """{arm: {column: value}}: what the arm table, report.json and each child run carry."""
    out: dict[str, dict] = {}
    for name, by_split in (("vs_full", decision.vs_full), ("vs_base", decision.vs_base),
                           ("vs_best", decision.vs_best)):
        for split, comparisons in by_split.items():
            for arm, c in comparisons.items():
                row = out.setdefault(arm, {})
                row[f"{split}_{name}_low"], row[f"{split}_{name}_high"] = c.low, c.high
                row[f"{split}_{name}_mean"] = c.mean
                row[f"{split}_{name}_verdict"] = c.verdict
                if c.settle:
                    row[f"{split}_{name}_settle"] = c.settle
    for split, tied in decision.ties.items():
        for arm in tied:
            out.setdefault(arm, {})[f"{split}_tied_with_best"] = True
    return out


def log_to_runs(client, trials: pd.DataFrame, decision: Decision) -> None:
    """Each child run gets its arm's bounds as metrics and its verdicts as tags: the MLflow compare page then
    sorts and filters arms by them."""
    from mlflow.entities import Metric, RunTag

    per_arm, now = columns(decision), int(time.time() * 1000)
    for _, run in trials[trials["status"] == "ok"].iterrows():
        values = per_arm.get(run["arm"], {})
        metrics = {k: float(v) for k, v in values.items() if isinstance(v, float) and v == v}
        tags = {f"peftsweep.{k}": str(v) for k, v in values.items() if not isinstance(v, float)}
        if metrics or tags:
            client.log_batch(run["run_id"], metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                             tags=[RunTag(k, v) for k, v in tags.items()])


# Per-row spreads assumed before anything ran. Counted as independent, the conservative end: accuracy at 50 %
# has the widest binomial spread; a ROUGE-L row score spreads ~0.2 around its mean on short headlines (0.17-0.24
# on BBC headlines with SmolLM2-135M arms here). Paired, what a sweep's comparisons really are: the spread of
# one row's difference between two close arms. Two MiniLM arms within 2 points of each other on rotten_tomatoes
# disagreed on 7-13 % of rows (per-row difference sd 0.26-0.36, median 0.30; the default sweep, seed 0, 2,000
# test and 500 validation rows); a row's ROUGE-L difference between SmolLM2-135M arms on BBC headlines spread
# 0.03-0.17, median 0.13 on validation and 0.16 on test (the sft search, seed 0). A sweep's own rows give the
# real figure once it ran (`rows_to_decide` in the report).
PRESUMED_ACCURACY = 0.5
PRESUMED_ROW_SD = {"rougeL": 0.2, "exact_match": 0.5, "chrf": 0.2, "bleu": 0.25}
PRESUMED_PAIRED_SD = {"accuracy": 0.30, "macro_f1": 0.30, "rougeL": 0.16}
# Seed noise before a sweep has measured any, in points: how far one seed moves the difference between two arms
# on the same rows, beyond the rows' own noise. MiniLM arms on rotten_tomatoes (2,000 validation and test rows),
# seeds 0/1/10/20/21 pooled over the 6 adapter arms against full FT: 1.16 on validation, 1.27 on test (15 df);
# SmolLM2-135M on BBC headlines, ROUGE-L: 0.0-0.76 (2 df, too few to trust, so the accuracy figure stands in).
# Seed racing alone reads it, to choose where a second seed is worth its cost while nothing is measured; no
# reported interval counts it.
PRESUMED_SEED_SD = 1.2
PRESUMED_SEED_DF = 15


def sizing(task, metric: str, margin: float) -> list[str]:
    """What `plan` prints before anything is spent: the smallest difference (95 % confidence, 80 % power) the
    validation and test rows can resolve between two close arms, paired (PRESUMED_PAIRED_SD) where the spread
    of a row's difference is known for the metric, and counting the rows as independent; a warning when the
    figure the report will use is wider than the margin."""
    scale = record.metric_scale(metric)
    if metric in ("loss", "perplexity"):
        return [f"sizing: {metric} is scored over the whole split, not per row: no row-level interval to size"]
    independent = (math.sqrt(2 * PRESUMED_ACCURACY * (1 - PRESUMED_ACCURACY)) if metric in ("accuracy", "macro_f1")
                   else math.sqrt(2) * PRESUMED_ROW_SD.get(metric, 0.25))
    sd = PRESUMED_PAIRED_SD.get(metric, independent)
    rows = {"validation": task.validation_size,
            "test": task.test_size}
    if task.type == "sft":  # generation metrics score only the generated rows
        rows = {k: min(v, task.generation_rows) for k, v in rows.items()}
    unit = "points" if scale == 100 else metric
    lines = []
    for split, n in rows.items():
        mdd = scale * float(paired.min_detectable_difference(n, sd=sd))
        needed = math.ceil((float(paired.min_detectable_difference(1, sd=sd)) * scale / margin) ** 2)
        how = (f"paired, a row's difference spreading {sd:g} as close arms' do; "
               f"{scale * float(paired.min_detectable_difference(n, sd=independent)):.1f} counting rows as "
               f"independent" if metric in PRESUMED_PAIRED_SD else "rows counted as independent; pairing narrows it")
        warn = (f" — wider than the margin ±{margin:g}: about {needed:,} rows would resolve it; seed racing "
                "(search.racing) averages out what seeds add, only rows narrow the rest" if mdd > margin else "")
        lines.append(f"sizing: {split} {n:,} rows resolve a difference of {mdd:.1f} {unit} between two arms "
                     f"(95 % confidence, 80 % power; {how}){warn}")
    return lines
