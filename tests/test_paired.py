"""Paired comparisons (evaluation/paired.py), calibrated on synthetic sweeps whose true difference is known.

A synthetic arm gets a row right when the row's difficulty (shared by every arm), the arm's own take on the
row, its seed's offset and a seed x row wobble, all normal, pass the arm's threshold: its accuracy over the
row population is then exactly a normal tail, so the true difference of two arms is set exactly. Seeds move an
arm by ~2 points here, as they move MiniLM arms (1-6 points)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from evaluation import paired
from evaluation.paired import (compare_to, min_detectable_difference, paired_corpus_diff, paired_diff_ci,
                               row_matrix, rows_to_decide, tie_set, verdict)

DRAWS = 1000
ROW_SD, OWN_SD, WOBBLE_SD = 1.5, 0.5, 0.8


def _sweep(rng, accuracies, rows, seeds=1, seed_sd=0.0, shared_seed_sd=0.0, draws=DRAWS):
    """[draws, seeds, rows] 0/1 scores of each arm, whose accuracy over rows and seeds is exactly `accuracies`.
    `shared_seed_sd`: the part of a seed's offset common to both arms' runs of that seed."""
    spread = math.sqrt(ROW_SD ** 2 + OWN_SD ** 2 + WOBBLE_SD ** 2 + seed_sd ** 2 + shared_seed_sd ** 2)
    difficulty = rng.normal(0, ROW_SD, (draws, 1, rows))
    shared = rng.normal(0, shared_seed_sd, (draws, seeds, 1))
    arms = []
    for accuracy in accuracies:
        threshold = -spread * stats.norm.ppf(accuracy)
        latent = (difficulty + rng.normal(0, OWN_SD, (draws, 1, rows)) + shared
                  + rng.normal(0, seed_sd, (draws, seeds, 1)) + rng.normal(0, WOBBLE_SD, (draws, seeds, rows)))
        arms.append((latent > threshold).astype(float))
    return arms


def _coverage(intervals, truth):
    return np.mean([d.low <= truth <= d.high for d in intervals])


def test_one_seed_paired_bootstrap_covers_the_true_difference_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(1)
    a, b = _sweep(rng, (0.78, 0.77), rows=300)
    intervals = [paired_diff_ci(a[i, 0], b[i, 0], n_resamples=300, rng=rng) for i in range(DRAWS)]
    covered = _coverage(intervals, 0.78 - 0.77)
    assert 0.93 <= covered <= 0.97, covered
    assert {d.pairing for d in intervals} == {"rows"}
    # the rows' shared difficulty cancels: narrower than the two arms' own errors side by side
    unpaired = np.sqrt(a.var(-1, ddof=1) / 300 + b.var(-1, ddof=1) / 300).ravel()
    assert np.mean([d.se for d in intervals]) < 0.75 * unpaired.mean()


@pytest.mark.parametrize("pairing", ["rows and seeds", "rows, independent seeds"])
def test_with_several_seeds_both_kinds_of_noise_count_and_intervals_cover(pairing):
    rng = np.random.default_rng(2)
    a, b = _sweep(rng, (0.78, 0.77), rows=500, seeds=3, seed_sd=0.1, shared_seed_sd=0.05)
    seeds_b = [0, 1, 2] if pairing == "rows and seeds" else [3, 4, 5]
    intervals = [paired_diff_ci(a[i], b[i], seeds_a=[0, 1, 2], seeds_b=seeds_b, rng=rng) for i in range(DRAWS)]
    assert {d.pairing for d in intervals} == {pairing}
    covered = _coverage(intervals, 0.01)
    assert 0.93 <= covered <= 0.97, covered
    # seed noise is real here: the rows alone (the seeds' mean scores, bootstrapped by row) miss it
    rows_only = [paired_diff_ci(a[i].mean(0), b[i].mean(0), n_resamples=200, rng=rng) for i in range(300)]
    assert _coverage(rows_only, 0.01) < 0.85


def test_seeds_pair_by_value_not_by_position():
    rng = np.random.default_rng(3)
    a, b = _sweep(rng, (0.8, 0.8), rows=200, seeds=3, seed_sd=0.3, shared_seed_sd=0.3, draws=1)
    by_value = paired_diff_ci(a[0], b[0][::-1], seeds_a=[0, 1, 2], seeds_b=[2, 1, 0], rng=0)
    in_order = paired_diff_ci(a[0], b[0], seeds_a=[0, 1, 2], seeds_b=[0, 1, 2], rng=0)
    assert (by_value.low, by_value.high) == (in_order.low, in_order.high)
    partial = paired_diff_ci(a[0], b[0], seeds_a=[0, 1, 2], seeds_b=[0, 1, 7])  # not the same seeds: independent
    assert partial.pairing == "rows, independent seeds"


def test_an_arm_whose_true_gap_is_one_and_a_half_margins_is_rarely_called_equivalent():
    rng = np.random.default_rng(4)
    margin = 0.02  # 2 points
    for seeds, rows in ((1, 500), (3, 500)):
        behind, ref = _sweep(rng, (0.74, 0.77), rows=rows, seeds=seeds, seed_sd=0.1 if seeds > 1 else 0.0)
        calls = [verdict(d.low, d.high, margin) for d in
                 (paired_diff_ci(behind[i], ref[i], seeds_a=range(seeds), seeds_b=range(seeds), n_resamples=300,
                                 rng=rng) for i in range(DRAWS))]
        assert calls.count("equivalent") / DRAWS <= 0.05, (seeds, calls.count("equivalent"))
    # and the verdict can say it: two arms alike, on enough rows, are mostly called equivalent
    same_a, same_b = _sweep(rng, (0.77, 0.77), rows=3000, draws=200)
    calls = [verdict(d.low, d.high, 0.03) for d in
             (paired_diff_ci(same_a[i, 0], same_b[i, 0], n_resamples=300, rng=rng) for i in range(200))]
    assert calls.count("equivalent") / 200 > 0.8, calls.count("equivalent")


@pytest.mark.parametrize("low,high,expected", [
    (-0.5, 0.5, "equivalent"), (0.2, 0.8, "equivalent"), (-0.8, -0.2, "equivalent"),  # within the margin of 1
    (0.5, 3.0, "better"), (1.5, 2.0, "better"),
    (-0.5, 2.0, "non_inferior"), (-0.99, 1.0, "non_inferior"),
    (-3.0, -1.5, "worse"), (-1.2, -1.01, "worse"),
    (-2.0, 0.5, "undecided"), (-1.0, 0.5, "undecided"), (-5.0, 5.0, "undecided"),
    (-3.0, -0.5, "undecided"),  # worse, but whether by more than the margin is open
])
def test_verdict_of_hand_chosen_intervals(low, high, expected):
    assert verdict(low, high, 1.0) == expected
    assert verdict(-high, -low, 1.0, mode="min") == expected  # a loss: lower is better, same reading


def test_verdict_rejects_nonsense():
    with pytest.raises(ValueError):
        verdict(1.0, -1.0, 1.0)
    with pytest.raises(ValueError):
        verdict(-1.0, 1.0, 1.0, mode="up")


def test_rows_to_decide_scales_as_one_over_root_n_and_says_when_nothing_decides():
    z = stats.norm.ppf(0.975)
    # half-width z at 500 rows; the mean is 1 above -margin: decided once z * sqrt(500 / n) < 1
    n = rows_to_decide(1.0, -1.0, 2.0, 500)
    assert n == math.ceil(500 * z ** 2)
    assert z * math.sqrt(500 / n) <= 1.0 < z * math.sqrt(500 / (n - 5))
    assert rows_to_decide(1.0, 1.0, 2.0, 500, mode="min") == n  # a loss 1 higher is 1 worse
    assert rows_to_decide(0.1, 3.0, 2.0, 500) == 500  # decided already
    assert rows_to_decide(1.0, -2.0, 2.0, 500) is None  # exactly on the margin: no n decides
    assert rows_to_decide(1.0, 2.5, 2.0, 500, target="equivalent") is None  # beyond the margin: never equivalent
    assert rows_to_decide(2.0, 0.0, 2.0, 500, target="equivalent") == math.ceil(500 * z ** 2)
    assert rows_to_decide(1.0, 0.0, 2.0, 500, target="equivalent") == 500


def test_rows_to_decide_agrees_with_the_intervals_it_projects():
    """Repeat one split's rows k times: the interval keeps its mean and narrows as 1/sqrt(k); it decides at
    about the number of rows rows_to_decide projected, not well before."""
    rng = np.random.default_rng(5)
    a, b = _sweep(rng, (0.765, 0.77), rows=200, draws=1)
    margin = 0.02
    first = paired_diff_ci(a[0, 0], b[0, 0], n_resamples=1000, rng=0)
    assert verdict(first.low, first.high, margin) == "undecided"
    needed = rows_to_decide(first.se, first.mean, margin, 200)
    for factor, decided in ((0.6, False), (1.6, True)):
        k = max(1, round(factor * needed / 200))
        grown = paired_diff_ci(np.tile(a[0, 0], k), np.tile(b[0, 0], k), n_resamples=1000, rng=0)
        assert (verdict(grown.low, grown.high, margin) != "undecided") == decided, (k, grown)


def test_tie_set_holds_the_arms_whose_difference_from_the_best_includes_zero():
    rng = np.random.default_rng(6)
    best, twin, behind = (x[0, 0] for x in _sweep(rng, (0.80, 0.80, 0.72), rows=1000, draws=1))
    arms = {"full": best, "lora_r8": twin, "lora_r1": behind}
    diffs = compare_to(arms, "full", rng=0)
    assert diffs["lora_r8"].low <= 0 <= diffs["lora_r8"].high and diffs["lora_r1"].high < 0
    assert tie_set(arms, "full", rng=0) == ["full", "lora_r8"]
    # with seeds, by seed value (3 seeds paired leave 2 degrees of freedom for seed noise: a wide interval)
    a, b, c = _sweep(rng, (0.80, 0.80, 0.62), rows=1000, seeds=3, seed_sd=0.1, draws=1)
    seeded = {"full": a[0], "lora_r8": b[0], "lora_r1": c[0]}
    assert tie_set(seeded, "full", seeds={k: [0, 1, 2] for k in seeded}, rng=0) == ["full", "lora_r8"]


def test_min_detectable_difference_shrinks_with_rows_and_matches_a_simulation():
    ns = np.array([100, 250, 500, 1000, 2000])
    mdd = min_detectable_difference(ns, base_rate=0.77)
    assert np.all(np.diff(mdd) < 0)
    assert min_detectable_difference(2000, base_rate=0.77) == pytest.approx(mdd[2] / 2)  # 1/sqrt(n)
    assert min_detectable_difference(500, sd=math.sqrt(2 * 0.77 * 0.23)) == pytest.approx(mdd[2])
    # two arms that err independently, around 77 % and the MDD apart, compared at 500 rows: found ~80 % of
    # the time
    rng = np.random.default_rng(7)
    sims, n, p = 4000, 500, 0.77
    delta = float(min_detectable_difference(n, base_rate=p))
    d = ((rng.random((sims, n)) < p + delta / 2).astype(float)
         - (rng.random((sims, n)) < p - delta / 2).astype(float))
    z = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = np.mean(np.abs(z) > stats.norm.ppf(0.975))
    assert power == pytest.approx(0.8, abs=0.03), power
    with pytest.raises(ValueError):
        min_detectable_difference(500)


def test_corpus_chrf_difference_uses_sacrebleus_paired_test():
    import sacrebleu

    rng = np.random.default_rng(8)
    words = "the a cat dog sat ran on under mat log fast slow red blue".split()
    references = [" ".join(rng.choice(words, 8)) for _ in range(60)]
    baseline = [" ".join(r.split()[:4] + list(rng.choice(words, 4))) for r in references]  # half right
    out = paired_corpus_diff(baseline, {"same": baseline, "exact": references}, references, n_samples=300, rng=0)
    base = sacrebleu.CHRF().corpus_score(baseline, [references]).score
    assert out["same"].baseline == out["exact"].baseline == pytest.approx(base)
    assert out["same"].mean == 0 and out["same"].low == out["same"].high == 0 and out["same"].p_value > 0.5
    assert out["exact"].score == pytest.approx(100.0)
    assert 0 < out["exact"].low < out["exact"].mean < out["exact"].high and out["exact"].p_value < 0.05


def test_row_matrix_lines_runs_up_by_row_id():
    first = pd.DataFrame({"row_id": ["a", "b", "c"], "score": [1.0, 0.0, 1.0]})
    second = pd.DataFrame({"row_id": ["c", "a", "b"], "score": [0.0, 1.0, 1.0]})
    ids, scores = row_matrix([first, second])
    assert ids == ["a", "b", "c"] and scores.tolist() == [[1, 0, 1], [1, 1, 0]]
    with pytest.raises(ValueError):
        row_matrix([first, second.iloc[:2]])


def test_inputs_that_cannot_be_paired_are_refused():
    with pytest.raises(ValueError):
        paired_diff_ci(np.ones(10), np.ones(11))
    with pytest.raises(ValueError):
        paired_diff_ci(np.array([1.0, np.nan]), np.ones(2))
    same = paired_diff_ci(np.array([1.0, 0.0, 1.0]), np.array([1.0, 0.0, 1.0]))
    assert (same.mean, same.low, same.high, same.se) == (0.0, 0.0, 0.0, 0.0)
    assert paired.VERDICTS == ("equivalent", "better", "non_inferior", "worse", "undecided")


def test_seeds_to_decide_is_the_rows_needed_over_the_rows_there_with_one_seed_and_seeds_with_several():
    """What racing reads to decide whether a seed can settle an undecided arm: with one seed an arm, k seeds
    at best act as k times the rows, so rows needed / rows there; with several, the seeds an arm."""
    from evaluation.verdicts import _compare

    rng = np.random.default_rng(3)
    full = (rng.random(500) < 0.78).astype(float)
    arm = full.copy()
    # 8 % of rows disagree, as many each way: a mean difference of 0 inside an interval of about +-1.7 points
    flip = np.concatenate([rng.choice(np.flatnonzero(full == 1), 20, replace=False),
                           rng.choice(np.flatnonzero(full == 0), 20, replace=False)])
    arm[flip] = 1 - arm[flip]
    one = _compare({"full": full[None], "arm": arm[None]}, {"full": [0], "arm": [0]}, "full", 1.0, "max", 100)["arm"]
    assert one.verdict == "undecided"
    needed = int(one.settle.split("about ")[1].split(" rows")[0].replace(",", ""))
    assert one.seeds_to_decide == pytest.approx(needed / 500)
    def seeded(ones_lost: int, zeros_won: int) -> np.ndarray:  # a seed moves the arm by a point or two
        out = full.copy()
        out[rng.choice(np.flatnonzero(full == 1), ones_lost, replace=False)] = 0
        out[rng.choice(np.flatnonzero(full == 0), zeros_won, replace=False)] = 1
        return out

    three = np.vstack([arm, seeded(25, 15), seeded(15, 20)])
    fulls = np.vstack([full, full, full])
    many = _compare({"full": fulls, "arm": three}, {"full": [0, 1, 2], "arm": [0, 1, 2]}, "full", 1.0, "max",
                    100)["arm"]
    assert many.verdict == "undecided" and "seeds an arm" in many.settle
    assert many.seeds_to_decide == int(many.settle.split("about ")[1].split(" seeds")[0].replace(",", ""))
    decided = _compare({"full": full[None], "arm": full[None]}, {}, "full", 1.0, "max", 100)["arm"]
    assert decided.verdict != "undecided" and decided.seeds_to_decide is None and decided.settle is None


def test_seed_noise_pooled_over_a_sweeps_arms_covers_at_two_seeds_and_is_far_narrower_than_one_pairs():
    """A raced sweep's arms at 2 seeds: one pair's seed part has 1 degree of freedom and its interval runs
    wide; pooled over the arms (seeds move them alike) it covers the truth as often and is far narrower. An arm
    at one seed, paired with the reference at that seed, then counts the seed noise the others measured."""
    from evaluation.paired import pooled_seed_noise

    rng = np.random.default_rng(6)
    accuracies = (0.78, 0.77, 0.775, 0.785, 0.77, 0.78)  # the reference is the last
    arms = _sweep(rng, accuracies, rows=500, seeds=2, seed_sd=0.1, shared_seed_sd=0.05)
    ref = arms[-1]
    pooled_iv, own_iv, one_seed_iv = [], [], []
    for i in range(DRAWS):
        pool = pooled_seed_noise([arm[i] - ref[i] for arm in arms[:-1]])
        pooled_iv.append(paired_diff_ci(arms[0][i], ref[i], seeds_a=[0, 1], seeds_b=[0, 1], rng=rng, pooled=pool))
        one_seed_iv.append(paired_diff_ci(arms[0][i][:1], ref[i], seeds_a=[0], seeds_b=[0, 1], rng=rng, pooled=pool))
        if i < 300:
            own_iv.append(paired_diff_ci(arms[0][i], ref[i], seeds_a=[0, 1], seeds_b=[0, 1], rng=rng))
    truth = accuracies[0] - accuracies[-1]
    assert 0.93 <= _coverage(pooled_iv, truth) <= 0.97, _coverage(pooled_iv, truth)
    assert 0.93 <= _coverage(one_seed_iv, truth) <= 0.98, _coverage(one_seed_iv, truth)
    assert {d.pairing for d in pooled_iv} == {"rows and seeds (seed noise pooled over the sweep's arms)"}
    assert {d.n_seeds for d in one_seed_iv} == {(1, 1)}  # paired at the seed both ran
    width = lambda ivs: np.median([d.high - d.low for d in ivs])  # noqa: E731
    assert width(pooled_iv) < 0.5 * width(own_iv), (width(pooled_iv), width(own_iv))
    # rows alone, one seed an arm, miss the seed noise the pool counts
    rows_only = [paired_diff_ci(arms[0][i][0], ref[i][0], n_resamples=200, rng=rng) for i in range(300)]
    assert _coverage(rows_only, truth) < _coverage(one_seed_iv, truth) - 0.05
    assert pooled_seed_noise([arms[0][0][:1] - ref[0][:1]]) is None  # one seed: nothing to pool


def test_seed_noise_measured_once_for_the_sweep_counts_in_every_comparison_the_best_arms_too():
    """The best adapter often ran one seed (racing seeds the arms that are open, not always it). Its tie set is
    still judged with the seed noise the raced arms measured against full FT: two arms equal in truth, each at
    one seed, tie about 95 % of the time; counting rows only, a seed's draw splits them far more often. With
    nothing measured, racing's presumed figure stands in, and without it the intervals say they count rows."""
    from evaluation.verdicts import sweep_seed_noise

    rng = np.random.default_rng(11)
    # full FT and four raced adapters at 2 seeds; two one-seed adapters equal in truth ("best" and "twin")
    accuracies = (0.78, 0.77, 0.775, 0.785, 0.77, 0.775, 0.775)
    arms = _sweep(rng, accuracies, rows=500, seeds=2, seed_sd=0.1, draws=300)
    names = ["full", "a", "b", "c", "d", "best", "twin"]
    seeds = {n: [0, 1] for n in names[:5]} | {"best": [0], "twin": [0]}
    measured_ties = rows_ties = 0
    for i in range(300):
        rows = {n: (arm[i] if len(seeds[n]) == 2 else arm[i][:1]) for n, arm in zip(names, arms)}
        pooled, noise = sweep_seed_noise(rows, seeds, "full", 500, 100.0)
        assert noise.source == "measured" and noise.df == 4  # one degree of freedom a raced adapter
        d = paired_diff_ci(rows["twin"], rows["best"], seeds_a=[0], seeds_b=[0], rng=rng, pooled=pooled)
        measured_ties += d.low <= 0 <= d.high
        d = paired_diff_ci(rows["twin"][0], rows["best"][0], n_resamples=200, rng=rng)
        rows_ties += d.low <= 0 <= d.high
    assert 0.92 <= measured_ties / 300 <= 0.99, measured_ties
    assert rows_ties / 300 < measured_ties / 300 - 0.1, (rows_ties, measured_ties)

    one = {n: arm[0][:1] for n, arm in zip(names, arms)}
    one_seeds = {n: [0] for n in names}
    assert sweep_seed_noise(one, one_seeds, "full", 500, 100.0)[1].source == "none"
    pooled, noise = sweep_seed_noise(one, one_seeds, "full", 500, 100.0, presumed_sd=1.2)
    assert (noise.source, noise.sd) == ("presumed", 1.2)
    presumed = paired_diff_ci(one["twin"], one["best"], seeds_a=[0], seeds_b=[0], rng=rng, pooled=pooled)
    rows_only = paired_diff_ci(one["twin"][0], one["best"][0], rng=rng)
    # the presumed seed part adds in quadrature to the rows': the half-width grows to about 1.96 x sqrt(1.2^2 + se^2)
    expected = 1.96 * math.sqrt(0.012 ** 2 + rows_only.se ** 2)
    assert (presumed.high - presumed.low) / 2 == pytest.approx(expected, rel=0.1)


def test_seeds_to_decide_projects_the_seeds_that_decide_with_the_power_it_says():
    """Racing spends a seed on an arm undecided against full FT only when max_seeds decide it at
    paired.POWER. The default demo's r8 q,v arm after one seed: -3.35 points (margin 1), seed noise 1.2 points
    and rows 0.9 (se 1.5), six arms pooled. "The same interval at 2 seeds" (normal quantile) promised 2 seeds;
    simulated with the sweep's pooled pivot, 2 decide it in under half the draws. The projection's 4 decide
    it at least 80 % of the time, and 3 do not."""
    from evaluation.paired import POWER, pooled_seed_noise, seeds_to_decide

    rng = np.random.default_rng(0)
    n, arms, mean, seed_sd, row_sd = 2000, 6, -0.0335, 0.012, 0.009
    se = math.hypot(seed_sd, row_sd)
    needed = seeds_to_decide(se, mean, 0.01, 1, arms, seed_share=(seed_sd / se) ** 2)
    assert stats.norm.ppf(0.975) * se / math.sqrt(2) < abs(mean + 0.01)  # what the old projection read: 2
    assert needed == 4

    def decided_share(k: int, draws: int = 400) -> float:
        hits = 0
        for _ in range(draws):
            tables = [(mean if a == 0 else rng.normal(0, 0.01)) + rng.normal(0, seed_sd, (k, 1))
                      + rng.normal(0, row_sd * math.sqrt(n), (k, n)) for a in range(arms)]
            diff = paired_diff_ci(tables[0], np.zeros_like(tables[0]), seeds_a=list(range(k)),
                                  seeds_b=list(range(k)), pooled=pooled_seed_noise(tables), rng=rng)
            hits += verdict(diff.low, diff.high, 0.01) != "undecided"
        return hits / draws

    assert decided_share(2) < 0.5
    assert decided_share(needed - 1) < POWER <= decided_share(needed)
    assert seeds_to_decide(se, -0.01, 0.01, 1, arms) is None  # on the margin: no number of seeds decides it
    # a loss is worse upwards; a mean inside the margin needs as many seeds as one as far outside it
    assert seeds_to_decide(se, -mean, 0.01, 1, arms, seed_share=(seed_sd / se) ** 2, mode="min") == needed
    assert seeds_to_decide(se, mean + 0.047, 0.01, 1, arms, seed_share=(seed_sd / se) ** 2) == needed
