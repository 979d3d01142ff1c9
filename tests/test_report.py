"""The report's statistics and the promotion rules, on trial tables shaped like `evaluation.runs.trial_table`
returns (the end-to-end tests run the same code on real sweeps)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from evaluation import plots
from evaluation.promote import PromotionRefused, choose
from evaluation.report import arm_table, ci95, delta_ci95, markdown, pareto_mask


def _run(arm, method, seed, test, val, mem, r=None, modules="attention_qv", status="ok", train_s=10.0,
         params=1000, wall=12.0, error=""):
    return {"arm": arm, "method": method, "seed": seed, "status": status, "r": r, "alpha": 2 * r if r else None,
            "target_modules": modules, "quantization": "none", "lr": 1e-3, "test_accuracy": test,
            "val_accuracy": val, "peak_host_rss_gb": mem, "train_time_s": train_s, "trainable_params": params,
            "trainable_pct": params / 1e5, "adapter_mb": params * 4 / 2 ** 20, "tokens_per_s": 100.0,
            "wall_time_s": wall, "error": error, "pruned_at_step": "", "gpu_share": None}


FULL = [_run("full", "full", s, t, v, 1.4, params=100_000, train_s=50, wall=60)
        for s, t, v in ((0, .80, .79), (1, .78, .78), (2, .79, .80))]
# a: close to full, paired deltas -1.0, -0.5, -1.5 points
A = [_run("lora-r16", "lora", s, t, v, 1.2, r=16, modules="all_linear", params=600)
     for s, t, v in ((0, .79, .79), (1, .775, .78), (2, .775, .795))]
# b: cheaper, further away
B = [_run("lora-r4", "lora", s, t, v, 1.1, r=4, params=300) for s, t, v in ((0, .70, .71), (1, .72, .73), (2, .71, .72))]
# c: below full FT and needing more memory than it, and one seed ran out of memory
C = [_run("lora-r8", "lora", 0, .79, .79, 1.5, r=8, modules="all_linear", params=400),
     _run("lora-r8", "lora", 1, .78, .78, 1.5, r=8, modules="all_linear", params=400),
     _run("lora-r8", "lora", 2, float("nan"), float("nan"), float("nan"), r=8, modules="all_linear", status="oom",
          error="OutOfMemoryError: injected")]


def _trials(*groups):
    return pd.DataFrame([row for g in groups for row in g])


def test_ci95_is_the_student_t_interval():
    values = [0.1, 0.4, 0.35, 0.2, 0.3]
    n = len(values)
    sd = pd.Series(values).std(ddof=1)
    assert ci95(values) == pytest.approx(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n), rel=1e-3)
    assert math.isnan(ci95([0.5]))


def test_delta_ci_is_paired_by_seed_when_seeds_match():
    arm, base = {0: 79.0, 1: 77.5, 2: 77.5}, {0: 80.0, 1: 78.0, 2: 79.0}
    diffs = [-1.0, -0.5, -1.5]
    assert delta_ci95(arm, base) == pytest.approx(ci95(diffs))
    # pairing removes the shared seed effect: narrower than treating the samples as independent
    unpaired = delta_ci95({10: 79.0, 11: 77.5, 12: 77.5}, base)
    assert unpaired > delta_ci95(arm, base)


def test_arm_table_compares_every_arm_with_full_ft():
    table = arm_table(_trials(FULL, A, B, C), "accuracy").set_index("arm")
    assert list(table.index)[0] == "full"  # the baseline heads the table
    assert table.loc["full", "test_mean"] == pytest.approx(79.0)
    assert table.loc["lora-r16", "test_delta_pts"] == pytest.approx(-1.0)
    assert table.loc["lora-r16", "test_delta_ci95"] == pytest.approx(ci95([-1.0, -0.5, -1.5]))
    assert table.loc["lora-r16", "peak_mem_gb_ratio"] == pytest.approx(1.2 / 1.4)
    assert table.loc["lora-r16", "train_time_s_ratio"] == pytest.approx(10 / 50)
    assert table.loc["lora-r16", "device_hours"] == pytest.approx(3 * 12 / 3600)
    # the OOM seed is counted, not averaged in
    assert table.loc["lora-r8", "runs_ok"] == 2 and table.loc["lora-r8", "runs"] == 3
    assert table.loc["lora-r8", "test_mean"] == pytest.approx(78.5)
    assert "oom" in table.loc["lora-r8", "statuses"]
    # frontier on memory: r4 (cheapest), r16 (better than r4, cheaper than full), full (best);
    # r8 is beaten by full FT on both
    assert table["pareto"].to_dict() == {"full": True, "lora-r16": True, "lora-r8": False, "lora-r4": True}


def test_pareto_mask_handles_ties_and_missing_values():
    assert pareto_mask([1, 1, 2, float("nan")], [1, 1, 3, 0]) == [True, True, True, False]
    assert pareto_mask([1, 2], [2, 1]) == [False, True]


def test_markdown_lists_runs_that_did_not_finish(tmp_path):
    trials = _trials(FULL, A, C)
    md = markdown(arm_table(trials, "accuracy"), trials, "accuracy", "s1")
    assert "Runs that did not finish ok (1 of 9)" in md
    assert "| lora-r8 | 2 | oom | OutOfMemoryError: injected |" in md
    assert "-1.00 ± " in md  # delta with its CI


def test_plots_and_heatmap_are_written(tmp_path):
    table = arm_table(_trials(FULL, A, B, C), "accuracy")
    png = plots.pareto_png(table, "accuracy", tmp_path / "p.png")
    heat = plots.rank_modules_heatmap(table, "accuracy", tmp_path / "h.png")
    for f in (png, heat):
        assert f.read_bytes()[:4] == b"\x89PNG" and f.stat().st_size > 10_000
    # one rank and one module set: nothing to lay out
    assert plots.rank_modules_heatmap(arm_table(_trials(FULL, B), "accuracy"), "accuracy", tmp_path / "x.png") is None


def test_promotion_rules_pick_by_validation():
    trials = _trials(FULL, A, B, C)
    best = choose(trials, "accuracy", "best")
    assert best.arm["arm"] == "lora-r16" and best.run["seed"] == 2  # its best validation seed
    # within 1 pt of full FT's val (79.0): r16 (78.83) and r8 (78.5); r16 is cheaper
    assert choose(trials, "accuracy", "cheapest_within", within_points=1.0).arm["arm"] == "lora-r16"
    # within 10 pts the cheapest is r4
    assert choose(trials, "accuracy", "cheapest_within", within_points=10).arm["arm"] == "lora-r4"
    assert choose(trials, "accuracy", "best_under_budget", memory_budget_gb=1.15).arm["arm"] == "lora-r4"
    with pytest.raises(PromotionRefused, match="fits 1.0 GB"):
        choose(trials, "accuracy", "best_under_budget", memory_budget_gb=1.0)
    with pytest.raises(PromotionRefused, match="within 0.1 pts"):
        choose(trials, "accuracy", "cheapest_within", within_points=0.1)
    with pytest.raises(PromotionRefused, match="needs a full fine-tuning arm"):
        choose(_trials(A, B), "accuracy", "cheapest_within")
    with pytest.raises(PromotionRefused, match="no adapter arm finished ok"):
        choose(_trials(FULL), "accuracy", "best")


def test_a_lower_is_better_metric_ranks_the_other_way_and_the_base_arm_gets_its_own_delta():
    def loss_run(arm, method, seed, loss, mem):
        row = _run(arm, method, seed, float("nan"), float("nan"), mem)
        row.update(test_loss=loss, val_loss=loss)
        return row

    trials = pd.DataFrame([loss_run("full", "full", 0, 1.0, 1.4), loss_run("lora-a", "lora", 0, 1.2, 1.0),
                           loss_run("lora-b", "lora", 0, 1.5, 0.9), loss_run("base", "base", 0, 3.0, 0.5)])
    table = arm_table(trials, "loss")
    assert list(table["arm"]) == ["full", "lora-a", "lora-b", "base"]  # full first, base last, best (lowest) first
    row = table.set_index("arm").loc["lora-a"]
    assert row["test_mean"] == pytest.approx(1.2)  # a loss is shown as it is, not in points
    assert row["test_delta_pts"] == pytest.approx(0.2) and row["test_vs_base_pts"] == pytest.approx(-1.8)
    # lower loss at more memory is on the frontier; full FT (lowest loss) is too
    assert bool(table.set_index("arm").loc["full", "pareto"]) and bool(row["pareto"])
    assert choose(trials, "loss").arm["arm"] == "lora-a"  # the lowest validation loss among adapters, never base
    md = markdown(table, trials, "loss", "s")
    assert "lower is better" in md and "vs base" in md and "test loss |" in md


def test_the_seed_interval_uses_the_exact_t_quantile_at_every_degree_of_freedom():
    """12 seeds: 11 degrees of freedom (a table that rounds 11 up to 15 prints a too-narrow interval)."""
    values = [0.71, 0.74, 0.69, 0.77, 0.72, 0.75, 0.70, 0.73, 0.76, 0.68, 0.74, 0.72]
    sd = pd.Series(values).std(ddof=1)
    assert ci95(values) == pytest.approx(stats.t.ppf(0.975, 11) * sd / math.sqrt(12), rel=1e-9)


def _decision(ties=(), vs_full_val=None, shippable=None):
    from evaluation.paired import verdict
    from evaluation.verdicts import Comparison, Decision

    d = Decision("accuracy", 1.0, split_rows={"val": 500, "test": 2000}, full_arm="full",
                 adapters=["lora-r16", "lora-r4", "lora-r8"])
    if ties:
        d.best["val"], d.ties["val"] = ties[0], list(ties)
        d.shippable["val"] = list(ties if shippable is None else shippable)
    d.vs_full["val"] = {arm: Comparison(arm, "full", (lo + hi) / 2, lo, hi, verdict(lo, hi, 1.0), "rows")
                        for arm, (lo, hi) in (vs_full_val or {}).items()}
    return d


def test_best_promotes_the_cheapest_tied_arm_shown_within_the_margin_of_the_best():
    trials = _trials(FULL, A, B, C)
    assert choose(trials, "accuracy", "best").arm["arm"] == "lora-r16"  # the top point estimate
    shown = choose(trials, "accuracy", "best", decision=_decision(ties=("lora-r16", "lora-r4")))
    assert shown.arm["arm"] == "lora-r4"  # 1.1 GB against r16's 1.2 GB: the cheaper of the two within the margin
    assert "2 arms tie with the best, lora-r16, within noise on 500 validation rows" in shown.reason
    assert "2 of them are shown within the margin" in shown.reason and "cheapest" in shown.reason
    # r4 ties (the data cannot tell it from r16) but is not shown within the margin: the best ships
    unsure = choose(trials, "accuracy", "best", decision=_decision(ties=("lora-r16", "lora-r4"),
                                                                   shippable=("lora-r16",)))
    assert unsure.arm["arm"] == "lora-r16" and "none of the others is shown within the margin" in unsure.reason
    alone = choose(trials, "accuracy", "best", decision=_decision(ties=("lora-r16",)))
    assert alone.arm["arm"] == "lora-r16" and "beyond noise" in alone.reason


def test_cheapest_within_reads_the_lower_bound_not_the_point_estimate():
    trials = _trials(FULL, A, B, C)
    # by point estimates r4 (9 points below full FT's val) is within 10 points; its interval reaches -12
    intervals = {"lora-r16": (-0.9, 0.1), "lora-r4": (-12.0, -6.0), "lora-r8": (-3.0, 1.0)}
    pick = choose(trials, "accuracy", "cheapest_within", within_points=10, decision=_decision(vs_full_val=intervals))
    assert choose(trials, "accuracy", "cheapest_within", within_points=10).arm["arm"] == "lora-r4"
    # r16 (1.2 GB) and r8 (1.5 GB) clear -10 points at their lower bounds: the cheaper of them
    assert pick.arm["arm"] == "lora-r16" and "interval" in pick.reason


def test_a_tie_is_an_interval_holding_zero_and_shipping_needs_one_clear_of_the_margin():
    from evaluation.paired import verdict
    from evaluation.verdicts import Comparison, shown_within, tied_with_best

    def c(low, high):
        return Comparison("x", "best", (low + high) / 2, low, high, verdict(low, high, 1.0), "rows")

    vs_best = {"close": c(-0.8, 0.4), "wide": c(-3.4, 1.4), "behind": c(-5.8, 0.2), "apart": c(-0.9, -0.1)}
    # no cut on the point estimate: `behind` (2.8 points down) cannot be told from the best, so it ties
    tied = tied_with_best("best", vs_best, ["best", "close", "wide", "behind", "apart"])
    assert tied == ["best", "close", "wide", "behind"]
    # only `close` is shown within 1 point of the best (its lower bound clears -1): the arms promotion picks among
    assert shown_within("best", vs_best, tied) == ["best", "close"]




def test_the_per_arm_interval_pools_the_seed_spread_over_the_arms():
    """At 2 seeds an arm, an arm's own spread has 1 degree of freedom (t = 12.7); pooled over the arms that
    trained, the t quantile counts every arm's degree of freedom, and an arm at one seed gets an interval."""
    from evaluation.report import pooled_ci95

    by_seed = pd.Series([[78.0, 79.5], [77.0, 76.0], [75.0, 75.5, 76.5], [74.0], [50.0, 50.0]])
    trains = pd.Series([True, True, True, True, False])  # the last is the base arm: no seed noise of its own
    own = pd.Series([ci95(v) for v in by_seed])
    half = pooled_ci95(by_seed, trains, own)
    variances = [np.var(v, ddof=1) for v in by_seed[:3]]
    pooled_sd = math.sqrt((variances[0] + variances[1] + 2 * variances[2]) / 4)  # df 1 + 1 + 2
    for i, n in enumerate((2, 2, 3, 1)):
        assert half[i] == pytest.approx(stats.t.ppf(0.975, 4) * pooled_sd / math.sqrt(n))
    assert half[0] < own[0] / 3  # t(4) = 2.78 against t(1) = 12.71
    assert half[4] == own[4]  # the base arm keeps its own (0: it scores the same at every seed)
    only_one = pd.Series([[78.0], [77.0]])
    assert pooled_ci95(only_one, pd.Series([True, True]), pd.Series([np.nan, np.nan])).isna().all()
