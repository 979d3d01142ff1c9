"""Paired comparisons of arms: is an adapter within a margin of full fine-tuning, and which arms tie the best?

Every arm of a sweep is scored on the same validation and test rows (one split seed), so two arms' difference
is judged row by row: the rows' own difficulty cancels, and the difference's interval is narrower than the two
arms' errors combined (accuracy on 500 rows at ~77 % has a standard error of ~1.9 points per arm); the more
often two arms are right on the same rows, the narrower. Pure functions over numpy arrays of per-row scores
(trainers.tracking.load_row_scores reads them; `row_matrix` lines runs up by row id); nothing here reads
MLflow.

Two kinds of noise move a difference: which rows the split drew (row noise) and which seed trained each arm
(seed noise; seeds move a MiniLM arm by 1-6 points). With one seed an arm, an interval can only count the rows,
and is conditional on those seeds. With several, both count (`paired_diff_ci`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from trainers import record

VERDICTS = ("equivalent", "better", "non_inferior", "worse", "undecided")
POWER = 0.8  # sizing and racing: what is worth spending rows or seeds on is what decides with this probability


@dataclass(frozen=True)
class PairedDiff:
    """The mean difference a - b in the rows' units (pass rows x trainers.record.metric_scale to get points),
    its interval at `confidence` and standard error; `pairing`: "rows" (one seed an arm), "rows and seeds"
    (several seeds, paired by seed value) or "rows, independent seeds"; `method`: how the interval was made;
    `df`: the t interval's degrees of freedom (independent seeds only)."""
    mean: float
    low: float
    high: float
    se: float
    confidence: float
    n_rows: int
    n_seeds: tuple[int, int]
    pairing: str
    method: str
    df: Optional[float] = None


def _generator(rng) -> np.random.Generator:
    # a report read twice must say the same thing: without a generator, a fixed seed
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)


def _as_seed_rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"per-row scores must be [n_rows] or [n_seeds, n_rows] with n_rows >= 2, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("per-row scores hold NaN or inf (sft loss is not scored per row)")
    return x


def paired_diff_ci(a_rows, b_rows, *, seeds_a: Optional[Sequence] = None, seeds_b: Optional[Sequence] = None,
                   pair_seeds: bool = True, n_resamples: int = 2000, confidence: float = 0.95, rng=None,
                   method: str = "percentile", pooled: Optional[tuple] = None) -> PairedDiff:
    """The mean difference a - b over the same rows, with its interval.

    `a_rows`, `b_rows`: per-row scores, [n_rows] (one seed) or [n_seeds, n_rows], the columns lined up by row
    id. `seeds_a`, `seeds_b`: the seed value of each of their rows; arms that ran the same seed values are
    paired by seed value (a seed fixes data order and initialisation in both), any other case (or
    `pair_seeds=False`) is treated as independent seeds. Pairing pays when a seed moves both arms alike; when
    it does not, it only halves the seed degrees of freedom (a wider interval).

    One seed an arm: a paired bootstrap over rows (scipy.stats.bootstrap, `method` "percentile" or "BCa",
    `n_resamples` draws of `rng`: a numpy Generator or seed, 0 when None): the interval counts row noise only,
    conditional on the two seeds.

    Several seeds in either arm: the seeds x rows table's variance components (mean squares of a crossed
    design: seed main effect, row main effect, their interaction), added up to the difference's variance
    without counting any twice. Seeds paired by value leave one seed component with n_seeds - 1 degrees of
    freedom (1 or 2 in a sweep), where a Welch-Satterthwaite t interval runs narrow (90.6 % coverage at 2
    seeds, 92-94 % at 3 where seeds dominate, on the synthetic sweeps of tests/test_paired.py): the interval is
    then a generalized pivot's (Weerahandi: each mean square drawn as ms x df / chi2(df) by `rng`, 20,000
    draws), which covered 95.7-97.4 % at 2-5 seeds. Independent seeds give two seed components, where the t
    interval on Welch-Satterthwaite degrees of freedom covered 94.3-97.1 % (the pivot: 99 %, needlessly wide).
    A bootstrap that resamples seeds and then rows counts the seed x row interaction at both levels (too wide
    when rows dominate) and cannot see the spread of 3 seeds (too narrow when seeds dominate): 83-98 % on the
    same sweeps. An arm with one seed adds no seed noise (none can be estimated from it). With 3 seeds that
    move an arm by ~2 points, a difference's interval is ~10 (independent) to ~13 (paired) points wide:
    seeds, not rows, are then what narrows it (`seeds_to_decide`).

    `pooled` (`pooled_seed_noise` of the sweep's arms against the same reference): the seed part of the
    variance as every arm's seeds show it together, with their summed degrees of freedom, in place of this
    pair's own. With 2 seeds an arm, one pair's seed part rests on 1 degree of freedom, and its interval runs
    ~12x the seed spread wide (a t quantile at 1 df): a raced sweep's arms at 2 seeds read +-18 points where
    one seed read +-5. Seeds move arms of one model, task and data alike, so the sweep pools them (a mixed
    model's homogeneous seed variance). The pair is compared at the seeds both ran (an arm raced to fewer
    seeds than its reference is paired at its own), and an arm at one seed then counts the seed noise the
    others measured, which a one-seed interval cannot.
    """
    a, b = _as_seed_rows(a_rows), _as_seed_rows(b_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a scores {a.shape[1]} rows and b {b.shape[1]}: line them up by row id first")
    n_rows = a.shape[1]
    if pooled is not None and seeds_a is not None and seeds_b is not None:
        index_a, index_b = common_seeds(seeds_a, seeds_b)
        if index_a:
            d = a[index_a] - b[index_b]
            mean = float(d.mean())
            low, high, se = _pivot_interval(d, mean, confidence, _generator(rng), pooled)
            return PairedDiff(mean, low, high, se, confidence, n_rows, (len(index_a), len(index_a)),
                              "rows and seeds (seed noise pooled over the sweep's arms)", "generalized pivot, pooled")
    mean = float(a.mean() - b.mean())
    if a.shape[0] == b.shape[0] == 1:
        return _bootstrap_rows(a[0], b[0], mean, n_resamples, confidence, _generator(rng), method)
    paired = (pair_seeds and seeds_a is not None and seeds_b is not None
              and len(set(seeds_a)) == len(seeds_a) == a.shape[0] and len(seeds_b) == b.shape[0]
              and sorted(seeds_a) == sorted(seeds_b))
    seeds = (a.shape[0], b.shape[0])
    if paired:
        order = {seed: i for i, seed in enumerate(seeds_b)}
        low, high, se = _pivot_interval(a - b[[order[s] for s in seeds_a]], mean, confidence, _generator(rng))
        return PairedDiff(mean, low, high, se, confidence, n_rows, seeds, "rows and seeds", "generalized pivot")
    terms = _seed_terms(a) + _seed_terms(b)
    per_row = a.mean(0) - b.mean(0)  # the rows' main effect of the difference, and each arm's interaction
    terms.append((per_row.var(ddof=1) / n_rows, n_rows - 1))
    variance = sum(v for v, _ in terms)
    df = variance ** 2 / sum(v ** 2 / k for v, k in terms) if variance > 0 else float(n_rows - 1)
    se = math.sqrt(variance)
    half = stats.t.ppf((1 + confidence) / 2, df) * se
    return PairedDiff(mean, mean - half, mean + half, se, confidence, n_rows, seeds, "rows, independent seeds",
                      "t (Welch-Satterthwaite)", df)


_PIVOT_DRAWS = 20_000


def _pivot_interval(d: np.ndarray, mean: float, confidence: float, rng: np.random.Generator,
                    pooled: Optional[tuple] = None) -> tuple[float, float, float]:
    """(low, high, se) of the mean of a seeds x rows table of paired differences: its variance is (seed less
    interaction mean square, at least 0, plus row mean square) / (seeds x rows); each mean square is drawn as
    ms x df / chi2(df), and the interval is the quantiles of mean - Z x sqrt(variance drawn), Z standard
    normal. `pooled`: (seed ms, its df, interaction ms, its df) measured over several arms, in place of d's."""
    r, c = d.shape
    ms_seeds, ms_rows, ms_inter = _crossed_ms(d)
    df_seeds, df_inter = r - 1, (r - 1) * (c - 1)
    if pooled is not None:
        ms_seeds, df_seeds, ms_inter, df_inter = pooled
    se = math.sqrt((max(ms_seeds - ms_inter, 0.0) + ms_rows) / d.size)

    def drawn(ms: float, df: float) -> np.ndarray:
        return ms * df / rng.chisquare(df, _PIVOT_DRAWS)

    # only the sum is kept from going below 0: holding the seed component itself at 0 or above widened the
    # interval past 97 % coverage wherever seeds move arms little
    drawn_sum = drawn(ms_seeds, df_seeds) - drawn(ms_inter, df_inter) + drawn(ms_rows, c - 1)
    variance = np.maximum(drawn_sum, 0.0) / d.size
    pivots = mean - rng.standard_normal(_PIVOT_DRAWS) * np.sqrt(variance)
    tail = (1 - confidence) / 2
    low, high = np.quantile(pivots, [tail, 1 - tail])
    return float(low), float(high), se


def common_seeds(seeds_a: Sequence, seeds_b: Sequence) -> tuple[list[int], list[int]]:
    """Positions in a's and in b's seed lists of the seed values both ran, in a's order."""
    seeds_b = list(seeds_b)
    pairs = [(i, seeds_b.index(s)) for i, s in enumerate(seeds_a) if s in seeds_b]
    return [i for i, _ in pairs], [j for _, j in pairs]


def pooled_seed_noise(tables: Sequence[np.ndarray]) -> Optional[tuple]:
    """(seed ms, df, interaction ms, df) pooled over seeds x rows tables of paired differences (each arm
    against one reference at the seeds both ran, all over the same rows): each table's sums of squares and
    degrees of freedom added up; None when no table has two seeds (nothing to pool)."""
    ss_seeds = ss_inter = df_seeds = df_inter = 0.0
    for d in tables:
        r, c = d.shape
        if r < 2:
            continue
        ms_seeds, _, ms_inter = _crossed_ms(d)
        ss_seeds, df_seeds = ss_seeds + ms_seeds * (r - 1), df_seeds + (r - 1)
        ss_inter, df_inter = ss_inter + ms_inter * (r - 1) * (c - 1), df_inter + (r - 1) * (c - 1)
    if not df_seeds:
        return None
    return ss_seeds / df_seeds, df_seeds, ss_inter / df_inter, df_inter


def _crossed_ms(x: np.ndarray) -> tuple[float, float, float]:
    """Mean squares of a seeds x rows table: seeds (df r-1), rows (df c-1), interaction (df (r-1)(c-1))."""
    r, c = x.shape
    seed_means, row_means, grand = x.mean(1), x.mean(0), x.mean()
    ms_seeds = c * ((seed_means - grand) ** 2).sum() / (r - 1) if r > 1 else 0.0
    ms_rows = r * ((row_means - grand) ** 2).sum() / (c - 1)
    residual = x - seed_means[:, None] - row_means[None, :] + grand
    ms_inter = (residual ** 2).sum() / ((r - 1) * (c - 1)) if r > 1 else 0.0
    return ms_seeds, ms_rows, ms_inter


def _seed_terms(x: np.ndarray) -> list[tuple[float, float]]:
    """An arm's seed noise as (variance of its mean, df) terms: the seed means' spread less the part of it the
    seed x row interaction explains (counted already with the rows); none when the spread is no larger than
    the interaction alone would make it, or with one seed."""
    r, c = x.shape
    if r < 2:
        return []
    ms_seeds, _, ms_inter = _crossed_ms(x)
    if ms_seeds <= ms_inter:
        return []
    return [(ms_seeds / (r * c), r - 1), (-ms_inter / (r * c), (r - 1) * (c - 1))]


def _bootstrap_rows(a, b, mean, n_resamples, confidence, rng, method) -> PairedDiff:
    n = len(a)
    if np.ptp(a - b) == 0:  # every row differs by the same amount (identical predictions): nothing to resample
        return PairedDiff(mean, mean, mean, 0.0, confidence, n, (1, 1), "rows", f"bootstrap ({method})")
    result = stats.bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                             n_resamples=n_resamples, confidence_level=confidence, method=method, rng=rng)
    low, high = result.confidence_interval
    return PairedDiff(mean, float(low), float(high), float(result.standard_error), confidence, n, (1, 1), "rows",
                      f"bootstrap ({method})")


def verdict(low: float, high: float, margin: float, mode: str = "max") -> str:
    """What an interval of (arm - reference) says against an equivalence margin (> 0, the metric's units).
    The question is whether the arm is within `margin` of the reference, so every verdict but `undecided`
    has the interval clear of -margin:
      equivalent    the whole interval inside (-margin, +margin): within the margin either way;
      better        entirely above 0 (and not equivalent);
      non_inferior  the lower bound above -margin, neither equivalent nor better: at worst slightly worse;
      worse         the upper bound below -margin: worse by more than the margin;
      undecided     the interval holds -margin. An interval entirely below 0 that reaches above -margin is
                    undecided too: the arm is worse, but whether by more than the margin is open.
    `mode` "min" (a loss): the interval is flipped first, so "better" always means better."""
    if low > high:
        raise ValueError(f"interval [{low}, {high}] is empty")
    if mode == "min":
        low, high = -high, -low
    elif mode != "max":
        raise ValueError(f"mode {mode!r} is not 'max' or 'min'")
    if -margin < low and high < margin:
        return "equivalent"
    if low > 0:
        return "better"
    if low > -margin:
        return "non_inferior"
    if high < -margin:
        return "worse"
    return "undecided"


def rows_to_decide(se: float, mean: float, margin: float, n_rows: int, *, confidence: float = 0.95,
                   mode: str = "max", target: str = "decided") -> Optional[int]:
    """About how many rows in all an interval around the same mean would need for `target`: "decided" (any
    verdict but undecided: the interval clear of -margin) or "equivalent" (inside +-margin). The half-width
    shrinks as 1/sqrt(n); the normal quantile stands in for the interval's. `n_rows` when there already; None when no number of rows gets there (a mean exactly on
    -margin; for equivalence, a mean at or beyond the margin)."""
    if target not in ("decided", "equivalent"):
        raise ValueError(f"target {target!r} is not 'decided' or 'equivalent'")
    if mode == "min":
        mean = -mean
    half = stats.norm.ppf((1 + confidence) / 2) * se
    room = abs(mean + margin) if target == "decided" else margin - abs(mean)
    if room <= 0:
        return None
    return max(n_rows, math.ceil(n_rows * (half / room) ** 2))


def seeds_to_decide(se: float, mean: float, margin: float, n_seeds: int, arms: int, *, seed_share: float = 1.0,
                    seed_df: float = 0.0, confidence: float = 0.95, power: float = POWER, mode: str = "max",
                    most: int = 1000) -> Optional[int]:
    """About how many seeds an arm would decide a comparison (its interval clear of -margin) with probability
    `power` should the difference be what it reads now: what racing weighs before it spends a seed (the
    sample size of plan's sizing, at the same power). `se`: the interval's at `n_seeds` seeds; seeds shrink
    its seed and row parts alike, as 1/k. The race's interval is a pivot whose seed part (`seed_share` of the
    variance) rests on about (k - 1) x `arms` degrees of freedom at k seeds (every arm the sweep pools; at
    least `seed_df`, what is measured now), the rows' on thousands: t's quantile at their
    Welch-Satterthwaite degrees of freedom stands in for the pivot's. The default demo's r8 q,v arm read
    -3.35 [-6.36, -0.35] after one seed; "the same interval at 2 seeds, normal quantile" projected 2 seeds,
    and its second seed left it undecided on test. This projects 4 (2 at 50 % power, 3 at 80 % with the
    normal quantile). At least `n_seeds` + 1 (an undecided arm needs more than it has); None when no number
    decides it (a mean exactly on -margin)."""
    if mode == "min":
        mean = -mean
    room = abs(mean + margin)
    if room <= 0:
        return None
    z_power = stats.norm.ppf(power)
    for k in range(n_seeds + 1, most + 1):
        df_seeds = max(seed_df, (k - 1) * max(arms, 1))
        df = df_seeds / seed_share ** 2 if seed_share > 0 else math.inf
        if (stats.t.ppf((1 + confidence) / 2, df) + z_power) * se * math.sqrt(n_seeds / k) < room:
            return k
    # past `most` seeds the degrees of freedom are in the thousands: the normal quantile is t's
    return math.ceil(n_seeds * ((stats.norm.ppf((1 + confidence) / 2) + z_power) * se / room) ** 2)


def compare_to(arms_rows: Mapping[str, np.ndarray], reference: str, *, seeds: Optional[Mapping[str, Sequence]] = None,
               **kwargs) -> dict[str, PairedDiff]:
    """Each other arm's `paired_diff_ci` against `reference` (arm - reference), by name. `arms_rows`: each
    arm's per-row scores ([n_rows] or [n_seeds, n_rows], lined up by row id); `seeds`: each arm's seed values
    (pairs seeds by value); `kwargs` go to paired_diff_ci."""
    seeds = seeds or {}
    return {name: paired_diff_ci(rows, arms_rows[reference], seeds_a=seeds.get(name), seeds_b=seeds.get(reference),
                                 **kwargs)
            for name, rows in arms_rows.items() if name != reference}


def tie_set(arms_rows: Mapping[str, np.ndarray], best: str, *, seeds: Optional[Mapping[str, Sequence]] = None,
            **kwargs) -> list[str]:
    """The arms tied with `best`: it, and every arm whose interval of (arm - best) includes 0, in the order of
    `arms_rows`. Promotion can pick among them by cost. Each comparison is at `confidence` on its own (no
    correction for several), and `best` was chosen on these same rows, so its lead is biased up a little:
    a tie is the cautious reading."""
    diffs = compare_to(arms_rows, best, seeds=seeds, **kwargs)
    return [name for name in arms_rows if name == best or diffs[name].low <= 0 <= diffs[name].high]


def min_detectable_difference(n_rows, *, base_rate: Optional[float] = None, sd: Optional[float] = None,
                              alpha: float = 0.05, power: float = POWER):
    """The smallest true difference a two-sided paired comparison at `n_rows` rows (scalar or array) detects
    with probability `power` at level `alpha`, normal approximation: (z_{1-alpha/2} + z_power) x sd / sqrt(n),
    in the rows' units. `sd`: the standard deviation of the per-row differences, when known (a paired
    comparison of correlated arms has a small one); or `base_rate` p, the two arms' mean accuracy: sd =
    sqrt(2 p (1 - p)), the arms' rows as if independent: exact for two independent samples of n rows (to
    first order in the difference), and a conservative bound for a paired one, whose arms err on many of the
    same rows."""
    if (base_rate is None) == (sd is None):
        raise ValueError("give exactly one of base_rate and sd")
    if sd is None:
        sd = math.sqrt(2 * base_rate * (1 - base_rate))
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return z * sd / np.sqrt(np.asarray(n_rows, dtype=float))


@dataclass(frozen=True)
class CorpusDiff:
    """A corpus metric (sacrebleu's 0-100 scale) of a system and of the baseline, their difference with its
    paired-bootstrap interval, and sacrebleu's paired bootstrap p-value (is the difference chance?)."""
    score: float
    baseline: float
    mean: float
    low: float
    high: float
    p_value: float


def paired_corpus_diff(baseline: Sequence[str], systems: Mapping[str, Sequence[str]], references: Sequence[str], *,
                       metric: str = "chrf", n_samples: int = 1000, confidence: float = 0.95,
                       rng=None) -> dict[str, CorpusDiff]:
    """Corpus chrF or BLEU (not means over rows, so not `paired_diff_ci`) of each system against the baseline's
    generations of the same rows: sacrebleu.significance.PairedTest's paired bootstrap for the p-value, and an
    interval of the difference from the same kind of resample (the same rows drawn for both systems, each
    draw's score from the rows' summed sufficient statistics, as PairedTest computes it). Scores are on
    sacrebleu's 0-100 scale: divide by 100 for the task metric's fraction."""
    import sacrebleu
    from sacrebleu.significance import PairedTest

    factories = {"chrf": sacrebleu.CHRF, "bleu": sacrebleu.BLEU}  # the metric modules' own settings
    if metric not in factories:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(factories)}")
    names = list(systems)
    refs = [list(references)]
    named = [("baseline", list(baseline))] + [(n, list(systems[n])) for n in names]
    _, table = PairedTest(named_systems=named, metrics={metric: factories[metric]()}, references=refs,
                          test_type="bs", n_samples=n_samples)()
    results = next(v for k, v in table.items() if k != "System")
    # the difference's interval: PairedTest gives each system's own interval, not the difference's
    scorer = factories[metric]()
    idx = _generator(rng).integers(0, len(references), size=(n_samples, len(references)))

    def resampled(hyps) -> np.ndarray:
        per_row = np.array(scorer._extract_corpus_statistics(list(hyps), refs), dtype=float)  # as PairedTest does
        return np.array([scorer._compute_score_from_stats(per_row[i].sum(0)).score for i in idx])

    base_draws = resampled(baseline)
    alpha = (1 - confidence) / 2
    out = {}
    for i, name in enumerate(names, start=1):
        diffs = resampled(systems[name]) - base_draws
        low, high = np.quantile(diffs, [alpha, 1 - alpha])
        # identical generations: every resampled difference is 0 like the observed one, and PairedTest's strict
        # `>` count then reports its smallest p-value; nothing distinguishes them
        p_value = 1.0 if list(systems[name]) == list(baseline) else float(results[i].p_value)
        out[name] = CorpusDiff(float(results[i].score), float(results[0].score),
                               float(results[i].score - results[0].score), float(low), float(high), p_value)
    return out


def row_matrix(frames: Sequence, column: str = record.ROW_SCORE, row_id: str = record.ROW_ID,
               dtype=float) -> tuple[list[str], np.ndarray]:
    """Per-row frames of one arm's runs (trainers.tracking.load_row_scores), or of several arms, as
    (row ids, [n_frames, n_rows] scores) in the first frame's row order; ValueError unless every frame scored
    the same rows (runs whose row_ids_hash params agree do)."""
    ids = list(frames[0][row_id])
    out = np.empty((len(frames), len(ids)), dtype=dtype)  # object: a text column (generations, references)
    for i, frame in enumerate(frames):
        by_id = frame.set_index(row_id)[column]
        if len(by_id) != len(ids) or not by_id.index.is_unique or set(by_id.index) != set(ids):
            raise ValueError(f"frame {i} scored other rows than frame 0: pair only runs of the same split")
        out[i] = by_id.loc[ids].to_numpy(dtype=dtype)
    return ids, out
