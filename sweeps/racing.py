"""Seed racing (search.racing): one seed of every arm first, then more seeds only for the arms whose question
is still open, up to search.max_seeds an arm.

Seeds move a small model's results by points, so one seed decides little; but most arms are settled by their
first seed (clearly within the margin of full fine-tuning, or clearly not), and seeds spent on those buy
nothing. The race runs in rounds on Ray Tune: `SeedRacer` is a Tune Searcher that hands out the round's
(arm, seed) trials as Tune asks for them and, once every trial of the round has completed, asks the driver
which arms are still open (`MlflowOpenArms`: the paired validation intervals of evaluation.verdicts, read
from the runs MLflow holds) and queues the next seed of each. Trials of a round still run side by side, on
one machine or a cluster, under any scheduler; Tune saves the searcher's state with its experiment state,
so `peftsweep sweep --resume` continues the race where it stopped.
"""
from __future__ import annotations

import pickle
import time
from typing import Callable, Iterable, Optional

from ray.tune.search import Searcher

from evaluation.runs import trial_table
from evaluation.verdicts import PRESUMED_SEED_SD, decide
from sweeps.plan import seed_pool
from trainers.tracking import client


def open_labels(decision, max_seeds: Optional[int] = None) -> set[str]:
    """The adapter arms a decision leaves open on validation (what picks; test only reports) that seeds can
    still settle: the interval against full FT still holds -margin (`undecided`) and `max_seeds` seeds an arm
    could decide it (Comparison.seeds_to_decide), or the arm is tied with the best adapter while the tie set
    holds more than one arm (which of them ships is open: any tied arm may be the best a second seed finds,
    and only seeds average out what one seed drew). An undecided arm no seed budget can settle is left to
    rows (the report says how many); a decided arm is settled either way. An arm without a finished run
    (failed, or pruned by ASHA) is in no comparison, so it is not open: another seed is not spent on it.

    Before any arm has run a second seed, `decision` should count the seed noise racing presumes
    (MlflowOpenArms does): a one-seed interval counts rows only, and calls arms decided and untied that a
    rerun reorders (the default sweep's seed-10 run raced nothing and called one arm better than full FT that
    seeds 0 and 20 put below it)."""
    adapters = set(decision.adapters)

    def seeds_can_settle(c) -> bool:
        if c.seeds_to_decide is None:
            return c.settle is None  # nothing estimated (a corpus metric): race it; "nothing decides it": no
        return max_seeds is None or c.seeds_to_decide <= max_seeds

    out = {arm for arm, c in decision.vs_full.get("val", {}).items()
           if c.verdict == "undecided" and seeds_can_settle(c)}
    ties = decision.ties.get("val", [])
    if len(ties) > 1:
        out |= set(ties)
    return out & adapters


class MlflowOpenArms:
    """The driver's answer to "which arms are still open?": the sweep's child runs as MLflow holds them,
    judged by evaluation.verdicts.decide as the report will judge them, with the seed noise racing presumes
    (verdicts.PRESUMED_SEED_SD) while no arm has run a second seed. Only what pickles is kept (no client):
    Tune pickles the searcher, and with it this, into the experiment's tuner.pkl, which `--resume` reads."""

    def __init__(self, tracking, parent_run_id: str, metric: str, margin: float, labels: dict,
                 max_seeds: Optional[int] = None, presumed_seed_sd: Optional[float] = PRESUMED_SEED_SD):
        self.tracking = tracking  # trainers.config.TrackingConfig of the sweep
        self.parent_run_id = parent_run_id
        self.metric = metric  # bare task metric (accuracy, rougeL): the one the report decides by
        self.margin = margin
        self.max_seeds = max_seeds
        self.presumed_seed_sd = presumed_seed_sd
        self.ids = {label: ray_id for ray_id, label in labels.items()}  # plan label -> Ray arm id

    def __call__(self, completed) -> set[str]:
        c = client(self.tracking)
        trials = trial_table(c, c.get_run(self.parent_run_id))
        return {self.ids[label] for label in self.open_of(c, trials) if label in self.ids}

    def open_of(self, c, trials) -> set[str]:
        """The arm labels still open, judged from these runs (a trial table of the sweep)."""
        if trials.empty:
            return set()
        return open_labels(decide(c, trials, self.metric, self.margin, self.presumed_seed_sd), self.max_seeds)


class SeedRacer(Searcher):
    """Proposes (arm, seed) trials in rounds. Round 1: every arm at the pool's first seed, in `arms` order (the
    plan's start order). Each later round: every open adapter arm at its next untried seed, and each reference
    arm (full FT) at every seed an adapter gets, so comparisons stay paired by seed. The race ends
    (Searcher.FINISHED) when no open arm has a seed left to try, or after as many rounds as the pool has seeds
    (an arm first open in the last round keeps the seeds it has: the wall time stays at most max_seeds
    rounds, whatever the race finds). A trial that errored or was stopped counts as
    run: its seed is not tried again (Ray's own retries, cluster.max_failures, happen before it completes).

    `run_ahead`: when Tune asks for a trial while the round's last trials run and nothing is queued (a slot
    would idle), each reference arm starts the next round's seed (`_reference_ahead`), once a round.

    `open_arms(completed)`: the Ray arm ids still open, given the (arm, seed) pairs completed so far. Should it
    raise (the tracking store down or locked for a moment), it is asked again every `retry_s` for `patience_s`
    before the error ends the sweep: a round boundary is no reason to lose a sweep to a short outage."""

    def __init__(self, arms: list[str], references: Iterable[str], pool: list[int],
                 open_arms: Callable[[list], set], verbose: bool = True, patience_s: float = 120.0,
                 retry_s: float = 5.0, run_ahead: bool = True):
        super().__init__()
        self.arms, self.references, self.pool = list(arms), [a for a in arms if a in set(references)], list(pool)
        self.open_arms, self.verbose, self.run_ahead = open_arms, verbose, run_ahead
        self.patience_s, self.retry_s = patience_s, retry_s
        self._failing_since: Optional[float] = None  # not state: an outage does not outlive the driver
        self._retry_at = 0.0
        self._tried: dict = {arm: [] for arm in self.arms}  # seeds queued, running or done, per arm
        self._queue: list = []
        self._live: dict = {}  # Tune trial id -> (arm, seed) of the round
        self._ahead: dict = {}  # Tune trial id -> (reference arm, next round's seed), started while a slot idled
        self._done: list = []  # (arm, seed, errored), in completion order
        self._round = 0
        self._finished = False
        self._enqueue([(arm, self.pool[0]) for arm in self.arms])

    # --- what Tune calls
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # arms and seeds come from here; the param space holds nothing to search

    def suggest(self, trial_id: str):
        if not self._queue and not self._live and not self._finished:
            if time.monotonic() < self._retry_at or not self._next_round():
                return None  # the open-arms question failed just now: Tune asks again
        if self._queue:
            arm, seed = self._queue.pop(0)
            self._live[trial_id] = (arm, seed)
            return {"arm": arm, "seed": seed}
        if self._live:
            ahead = self._reference_ahead()
            if ahead is not None:
                self._tried[ahead[0]].append(ahead[1])
                self._ahead[trial_id] = ahead
                return {"arm": ahead[0], "seed": ahead[1]}
            return None  # the round is running: which arms stay open is known only once it ends
        self._finished = True
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        pair = self._live.pop(trial_id, None) or self._ahead.pop(trial_id, None)
        if pair is not None:
            self._done.append((*pair, bool(error)))

    def _reference_ahead(self) -> Optional[tuple]:
        """A reference arm at the seed the next round hands out, while the round's last trials still run and
        a slot would idle: the reference runs every seed any adapter gets, so the next round, if there is one,
        needs it (the default sweep's first round is 7 trials on 2 slots, and its last trial ran alone for
        63 s). Once a round, never in the last one; its result does not enter the round's judgement (only
        finished runs are judged, and a reference's extra seed pairs with no adapter's yet)."""
        if not self.run_ahead or self._round >= len(self.pool):
            return None
        upcoming = self.pool[self._round]
        for ref in self.references:
            if upcoming not in self._tried[ref]:
                return ref, upcoming
        return None

    # --- state: Tune saves it beside its experiment state and restores it on --resume
    def get_state(self) -> dict:
        return {"arms": self.arms, "references": self.references, "pool": self.pool, "tried": self._tried,
                "queue": self._queue, "live": self._live, "ahead": self._ahead, "done": self._done,
                "round": self._round, "finished": self._finished}

    def set_state(self, state: dict) -> None:
        self.arms, self.references, self.pool = state["arms"], state["references"], state["pool"]
        self._tried, self._queue, self._live = state["tried"], state["queue"], state["live"]
        self._ahead = state.get("ahead", {})
        self._done, self._round, self._finished = state["done"], state["round"], state["finished"]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    # --- the race
    @property
    def completed(self) -> list:
        return [(arm, seed) for arm, seed, _ in self._done]

    def _next_seed(self, arm: str) -> Optional[int]:
        return next((s for s in self.pool if s not in self._tried[arm]), None)

    def _next_round(self) -> bool:
        """Queue the next round (nothing when no open arm has a seed left); False when the open arms could
        not be read this time."""
        try:
            open_ = set(self.open_arms(self.completed)) - set(self.references)
        except Exception as exc:  # noqa: BLE001 - whatever the store raised, the judgement is retried or raised
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            if now - self._failing_since > self.patience_s:
                raise
            print(f"seed racing: cannot read which arms are open ({type(exc).__name__}: {exc}); asking again in "
                  f"{self.retry_s:g} s", flush=True)
            self._retry_at = now + self.retry_s
            return False
        self._failing_since = None
        if self._round >= len(self.pool):  # a round a seed of the pool: the wall time is max_seeds rounds at most
            if self.verbose:
                print(f"seed racing: round {self._round} done; search.max_seeds={len(self.pool)} rounds run"
                      + (f" ({', '.join(sorted(open_))} still open)" if open_ else ""), flush=True)
            return True
        new = [(arm, self._next_seed(arm)) for arm in self.arms if arm in open_]
        new = [(arm, seed) for arm, seed in new if seed is not None]  # at max_seeds: the budget is spent
        seeds = {seed for _, seed in new}
        new += [(ref, seed) for ref in self.references for seed in seeds if seed not in self._tried[ref]]
        if self.verbose:
            capped = sorted(open_ - {arm for arm, _ in new})
            print(f"seed racing: round {self._round} done; "
                  + (f"next round: {', '.join(f'{a} seed {s}' for a, s in self._order(new))}" if new
                     else "every arm decided" if not open_ else "no open arm has a seed left")
                  + (f" ({', '.join(capped)} still open at search.max_seeds)" if capped else ""), flush=True)
        self._enqueue(new)
        return True

    def _order(self, pairs: list) -> list:
        """Seed by seed, each in the plan's start order (the longest trials first)."""
        return sorted(pairs, key=lambda p: (self.pool.index(p[1]), self.arms.index(p[0])))

    def _enqueue(self, pairs: list) -> None:
        if not pairs:
            return
        self._round += 1
        for arm, seed in self._order(pairs):
            self._tried[arm].append(seed)
            self._queue.append((arm, seed))


def racer(cfg, plan, parent_run_id: str) -> SeedRacer:
    """The sweep's SeedRacer: the plan's arms (Ray ids, start order), its reference arms, the seed pool and
    the open-arm question asked of MLflow against report.margin (the margin the report and promotion use)."""
    ids, pool = plan.ray_ids, seed_pool(cfg.search.seeds, cfg.search.max_seeds)
    # what the verdicts compare against, re-run at every seed an adapter gets so the comparison stays paired by
    # seed: every full-FT arm, the space's own included (the report picks the best of them as the baseline).
    # Not the base arm: it trains nothing (an sft base model answers the same at every seed, a classifier's
    # untrained head scores chance at every seed), so a further seed of it buys no comparison.
    references = [ray_id for ray_id in ids if plan.trial_dict(ray_id, pool[0])["method"]["name"] == "full"]
    judge = MlflowOpenArms(cfg.trial.tracking, parent_run_id, cfg.trial.task.metric, cfg.report.margin, ids,
                           cfg.search.max_seeds)
    return SeedRacer(list(ids), references, pool, judge, patience_s=cfg.trial.tracking.outage_timeout_s)


def log_spent(c, parent_run_id: str, spent: int, worst: int) -> None:
    """On the parent run: the trials the race ran against the grid it replaced. Metrics, not params: a resumed
    sweep logs them again with its final counts."""
    c.log_metric(parent_run_id, "racing_trials", spent)
    c.log_metric(parent_run_id, "racing_grid_trials", worst)
