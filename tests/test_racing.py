"""Seed racing (sweeps/racing.py): the SeedRacer driven as Ray Tune drives it, the open-arm rule on hand-made
decisions, the refusals before Ray, and one real racing sweep on the tiny model."""
import subprocess

import pytest

from sweeps.cli import main
from sweeps.racing import SeedRacer, open_labels, seed_pool
from tests.conftest import BIN, tiny_overrides
from trainers import record

ARMS = ["arm01", "arm02", "arm03", "arm04"]  # arm01: full FT (the plan starts it first)


class Judge:
    """A hand-written open_arms: answers from a list, one answer per round, and remembers what it was asked."""

    def __init__(self, *answers):
        self.answers, self.asked = list(answers), []

    def __call__(self, completed):
        self.asked.append(sorted(completed))
        return set(self.answers.pop(0)) if self.answers else set()


def _take(racer, n=100, start=0):
    """Ask for trials as Tune does until the racer answers None or FINISHED: {trial id: (arm, seed)}."""
    out = {}
    for i in range(start, start + n):
        config = racer.suggest(f"t{i}")
        if config is None or config == SeedRacer.FINISHED:
            break
        out[f"t{i}"] = (config["arm"], config["seed"])
    return out


def _complete(racer, trials, errored=()):
    for trial_id in trials:
        racer.on_trial_complete(trial_id, None if trial_id in errored else {"status": "ok"},
                                error=trial_id in errored)


def test_seed_pool_extends_the_listed_seeds_with_the_next_integers():
    assert seed_pool([0], 3) == [0, 1, 2]
    assert seed_pool([5, 0], 3) == [5, 0, 1]  # after the last listed, not the largest
    assert seed_pool([1, 2], 4) == [1, 2, 3, 4]
    assert seed_pool([3, 2], 4) == [3, 2, 4, 5]  # never a seed twice
    assert seed_pool([7, 8], 2) == [7, 8]


def test_the_first_round_is_every_arm_at_the_first_seed_and_waits_for_its_trials():
    racer = SeedRacer(ARMS, ["arm01"], [0, 1, 2], Judge(), verbose=False, run_ahead=False)
    first = _take(racer)
    assert list(first.values()) == [(arm, 0) for arm in ARMS]  # in the plan's start order
    assert racer.suggest("t98") is None  # trials still run: Tune asks again later
    _complete(racer, list(first)[:3])
    assert racer.suggest("t99") is None  # one still runs: the round is not over


def test_a_slot_that_would_idle_at_a_rounds_end_starts_full_ft_at_the_next_seed():
    """Tune asks for a trial whenever it could start one; with the round handed out, the racer starts the
    reference arm at the next round's seed instead of leaving the slot idle: once a round, never in the last,
    without delaying the round's judgement, and never twice at a seed."""
    judge = Judge({"arm03"})
    racer = SeedRacer(ARMS, ["arm01"], [0, 1], judge, verbose=False)
    first = _take(racer, n=len(ARMS))
    assert racer.suggest("t90") == {"arm": "arm01", "seed": 1}  # the queue is empty and the round still runs
    assert racer.suggest("t91") is None  # once a round
    _complete(racer, first)  # the round's own trials are done; the reference's seed 1 still runs
    second = _take(racer, start=10)
    assert judge.asked == [sorted((a, 0) for a in ARMS)]  # judged at once, on the round's trials alone
    assert list(second.values()) == [("arm03", 1)]  # full FT's seed 1 already runs: not queued again
    assert racer.suggest("t95") is None  # the last round: no seed of the pool left to run ahead
    _complete(racer, ["t90", *second])
    assert racer.suggest("t96") == SeedRacer.FINISHED
    assert sorted(racer.completed) == sorted([(a, 0) for a in ARMS] + [("arm01", 1), ("arm03", 1)])

    restored = SeedRacer(ARMS, ["arm01"], [0, 1], Judge(), verbose=False)
    _take(restored, n=len(ARMS))
    restored.suggest("t90")
    state = restored.get_state()
    assert state["ahead"] == {"t90": ("arm01", 1)}
    again = SeedRacer(ARMS, ["arm01"], [0, 1], Judge(), verbose=False)
    again.set_state(state)
    assert again.suggest("t91") is None  # restored mid-round: the reference already runs ahead


def test_a_later_round_adds_the_next_seed_only_to_open_arms_and_full_ft():
    judge = Judge({"arm03"})
    racer = SeedRacer(ARMS, ["arm01"], [0, 1, 2], judge, verbose=False, run_ahead=False)
    first = _take(racer)
    _complete(racer, first)
    second = _take(racer, start=10)
    assert sorted(second.values()) == [("arm01", 1), ("arm03", 1)]
    assert judge.asked == [sorted((arm, 0) for arm in ARMS)]  # asked once, with every completed trial


def test_the_reference_arms_follow_every_seed_an_adapter_gets():
    """Full FT and the base arm: whatever seed any adapter arm gets, so each comparison stays paired by seed."""
    arms = ["arm01", "arm02", "arm03", "arm04", "base"]
    judge = Judge({"arm02"}, {"arm02", "arm04"})
    racer = SeedRacer(arms, ["arm01", "base"], [0, 1, 2], judge, verbose=False, run_ahead=False)
    _complete(racer, _take(racer))
    assert sorted(_take(racer, start=10).values()) == [("arm01", 1), ("arm02", 1), ("base", 1)]
    _complete(racer, [f"t{i}" for i in range(10, 13)])
    # arm04 was decided after seed 0 and is open again now: it gets its own next seed (1), arm02 its third (2)
    third = _take(racer, start=20)
    assert sorted(third.values()) == [("arm01", 2), ("arm02", 2), ("arm04", 1), ("base", 2)]
    assert list(third.values())[:2] == [("arm04", 1), ("arm01", 2)]  # seed by seed, in start order


def test_no_arm_gets_more_than_max_seeds_and_the_race_then_finishes():
    judge = Judge(*[set(ARMS)] * 10)  # everything open, always
    racer = SeedRacer(ARMS, ["arm01"], seed_pool([0], 3), judge, verbose=False, run_ahead=False)
    ran, start = [], 0
    while True:
        got = _take(racer, start=start)
        if not got:
            break
        ran += got.values()
        _complete(racer, got)
        start += 100
    assert racer.suggest("t-last") == SeedRacer.FINISHED
    assert sorted(ran) == sorted((arm, s) for arm in ARMS for s in (0, 1, 2))  # the grid, not a trial more
    assert len(judge.asked) == 3  # after rounds 1, 2 and 3; the third answer finds no seed left


def test_the_race_runs_at_most_as_many_rounds_as_the_pool_has_seeds():
    """Wall time is rounds: an arm first open after the last round keeps its seeds, though it has one untried."""
    racer = SeedRacer(ARMS, ["arm01"], [0, 1], Judge({"arm02"}, {"arm03"}), verbose=False, run_ahead=False)
    first = _take(racer)
    _complete(racer, first)
    second = _take(racer, start=100)
    assert sorted(second.values()) == [("arm01", 1), ("arm02", 1)]
    _complete(racer, second)
    assert racer.suggest("t-last") == SeedRacer.FINISHED  # arm03 open now, but 2 rounds of a 2-seed pool ran
    assert ("arm03", 1) not in racer.completed


def test_finished_when_no_arm_is_open():
    judge = Judge(set())
    racer = SeedRacer(ARMS, ["arm01"], [0, 1, 2], judge, verbose=False, run_ahead=False)
    _complete(racer, _take(racer))
    assert racer.suggest("t50") == SeedRacer.FINISHED
    assert racer.suggest("t51") == SeedRacer.FINISHED and len(judge.asked) == 1  # not asked again


def test_an_open_reference_arm_alone_adds_nothing():
    """Only adapter arms are raced; a judge naming full FT does not buy it seeds on its own."""
    racer = SeedRacer(ARMS, ["arm01"], [0, 1, 2], Judge({"arm01"}), verbose=False, run_ahead=False)
    _complete(racer, _take(racer))
    assert racer.suggest("t50") == SeedRacer.FINISHED


def test_an_errored_trial_counts_as_run_and_is_not_queued_again():
    racer = SeedRacer(ARMS, ["arm01"], [0, 1, 2], Judge({"arm02"}), verbose=False, run_ahead=False)
    first = _take(racer)
    errored = next(t for t, pair in first.items() if pair == ("arm02", 0))
    _complete(racer, first, errored={errored})
    assert sorted(_take(racer, start=10).values()) == [("arm01", 1), ("arm02", 1)]  # its next seed, not 0 again
    assert ("arm02", 0, True) in racer.get_state()["done"]


def test_save_and_restore_continue_the_race_mid_round(tmp_path):
    """What `--resume` relies on: Tune saves the searcher with its experiment state and, on restore, calls
    restore() on the searcher it unpickled from tuner.pkl (built before anything ran)."""
    def race(racer, stop_after=None):
        log, start = [], 0
        while True:
            got = _take(racer, n=2, start=start)  # two slots: trials of a round run while others queue
            log += got.values()
            if stop_after is not None and len(log) >= stop_after:
                return log, got
            if not got:
                if racer.suggest(f"x{start}") == SeedRacer.FINISHED:
                    return log, {}
            _complete(racer, got)
            start += 100

    answers = ({"arm02", "arm04"}, {"arm04"})
    whole, _ = race(SeedRacer(ARMS, ["arm01"], [0, 1, 2], Judge(*answers), verbose=False, run_ahead=False))

    original = SeedRacer(ARMS, ["arm01"], [0, 1, 2], Judge(*answers), verbose=False, run_ahead=False)
    before, running = race(original, stop_after=6)  # round 2 under way: two trials running, one queued
    assert running and original.get_state()["queue"]
    path = tmp_path / "searcher-state.pkl"
    original.save(str(path))

    # as unpickled: round 1 queued
    fresh = SeedRacer(ARMS, ["arm01"], [0, 1, 2], Judge(answers[1]), verbose=False, run_ahead=False)
    fresh.restore(str(path))
    assert fresh.get_state() == original.get_state()
    _complete(fresh, running)  # the trials Tune resumes keep their ids
    after, _ = race(fresh)
    assert before + after == whole


def test_a_store_that_fails_for_a_moment_is_asked_again_then_the_error_ends_the_sweep():
    calls = []

    def flaky(completed):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("tracking server down")
        return {"arm02"}

    racer = SeedRacer(ARMS, ["arm01"], [0, 1, 2], flaky, verbose=False, run_ahead=False, retry_s=0)
    _complete(racer, _take(racer))
    assert racer.suggest("t50") is None  # not FINISHED: the race is not over because the store blinked
    assert sorted(_take(racer, start=60).values()) == [("arm01", 1), ("arm02", 1)]

    def down(completed):
        raise ConnectionError("tracking server down")

    racer = SeedRacer(ARMS, ["arm01"], [0, 1, 2], down, verbose=False, run_ahead=False, retry_s=0, patience_s=0)
    _complete(racer, _take(racer))
    assert racer.suggest("t50") is None  # the first failure starts the clock
    with pytest.raises(ConnectionError):
        racer.suggest("t51")


def test_open_arms_are_undecided_against_full_ft_or_tied_with_the_best():
    from evaluation.paired import verdict
    from evaluation.verdicts import Comparison, Decision

    d = Decision("accuracy", 1.0, full_arm="full", adapters=["a", "b", "c", "d"])
    intervals = {"a": (-3.0, 2.0), "b": (-0.5, 0.5), "c": (-9.0, -5.0), "d": (-0.8, 3.0)}
    d.vs_full["val"] = {arm: Comparison(arm, "full", (lo + hi) / 2, lo, hi, verdict(lo, hi, 1.0), "rows")
                        for arm, (lo, hi) in intervals.items()}
    assert [d.vs_full["val"][a].verdict for a in "abcd"] == ["undecided", "equivalent", "worse", "non_inferior"]
    d.ties["val"] = ["d"]
    assert open_labels(d) == {"a"}  # a lone best is no open question
    d.ties["val"] = ["d", "b"]
    assert open_labels(d) == {"a", "b", "d"}  # which of d and b is best is open
    d.vs_full["test"] = {"c": Comparison("c", "full", 0, -5.0, 5.0, "undecided", "rows")}
    assert "c" not in open_labels(d)  # test reports; validation picks
    d.vs_full["val"]["full-lr1e-3"] = Comparison("full-lr1e-3", "full", 0, -5, 5, "undecided", "rows")
    assert "full-lr1e-3" not in open_labels(d)  # a second full-FT arm is a reference, not a raced adapter


def test_an_undecided_arm_is_raced_only_while_seeds_can_settle_it():
    """Seeds narrow the seed part of an interval; when only many more rows would decide an arm (its one-seed
    interval straddles -margin by far more than max_seeds seeds could shrink it), racing spends nothing on it."""
    from evaluation.verdicts import Comparison, Decision

    d = Decision("accuracy", 1.0, full_arm="full", adapters=["near", "far", "stuck", "corpus"])
    d.vs_full["val"] = {
        "near": Comparison("near", "full", -0.4, -1.6, 0.8, "undecided", "rows", "about 2,600 rows (now 2,000)", 1.3),
        "far": Comparison("far", "full", -0.8, -3.4, 1.8, "undecided", "rows", "about 150,000 rows (now 500)", 300.0),
        "stuck": Comparison("stuck", "full", -1.0, -2.0, 0.0, "undecided", "rows",
                            "no number of rows decides it (the difference sits on the margin)", None),
        "corpus": Comparison("corpus", "full", 0.0, -5.0, 5.0, "undecided", "rows (corpus bootstrap)"),
    }
    assert open_labels(d, max_seeds=3) == {"near", "corpus"}  # a corpus metric has no estimate: raced
    assert open_labels(d, max_seeds=1000) == {"near", "far", "corpus"}
    assert open_labels(d) == {"near", "far", "corpus"}  # no budget given: every seed-settleable arm
    d.ties["val"] = ["near", "far"]
    assert open_labels(d, max_seeds=3) == {"near", "far", "corpus"}  # a tie is open whatever the rows say


def test_every_tied_arm_is_raced_since_any_may_be_the_best_a_second_seed_finds():
    from evaluation.verdicts import Comparison, Decision

    d = Decision("accuracy", 1.0, full_arm="full", adapters=["r4", "r8", "r16", "qv"])
    d.vs_full["val"] = {a: Comparison(a, "full", 0.0, -0.5, 0.5, "equivalent", "rows") for a in d.adapters}
    d.best["val"], d.ties["val"] = "r8", ["r8", "r16", "r4"]
    assert open_labels(d, 3) == {"r8", "r16", "r4"}
    d.ties["val"] = ["r8"]
    assert open_labels(d, 3) == set()  # every arm equivalent and a lone best: nothing to race


def test_the_racer_pickles_for_tuner_pkl(tiny_bert, store):
    """Tune pickles the searcher (and the driver's open-arm judge with it) into tuner.pkl, which --resume reads:
    the sweep's racer must survive ray.cloudpickle with its arms, references and pool."""
    import ray.cloudpickle as cloudpickle

    from sweeps.config import load
    from sweeps.plan import build_plan
    from sweeps.racing import MlflowOpenArms, racer

    cfg = load(["search=tiny", "search.racing=true", "+search.base_arm=true", *tiny_overrides(tiny_bert, store)])
    plan = build_plan(cfg)
    back = cloudpickle.loads(cloudpickle.dumps(racer(cfg, plan, "parent123")))
    full = next(i for i, label in plan.ray_ids.items() if label.startswith("full"))
    base = next(i for i, label in plan.ray_ids.items() if label == "base")
    assert back.arms == list(plan.ray_ids) and back.references == [full]  # base trains nothing: never re-seeded
    assert base in back.arms
    assert back.pool == [0, 1, 2] and isinstance(back.open_arms, MlflowOpenArms)
    assert back.open_arms.parent_run_id == "parent123" and back.open_arms.margin == cfg.report.margin
    assert back.open_arms.max_seeds == cfg.search.max_seeds
    assert back.open_arms.ids == {label: i for i, label in plan.ray_ids.items()}


@pytest.mark.parametrize("overrides,message", [
    (["searcher=optuna"], "search.racing=true adds seeds to the plan's fixed arms, but searcher=optuna proposes "
                          "its own configurations"),
    (["+search.space.train.lr={loguniform:[1e-4,1e-2]}"], "search.space.train.lr is sampled"),
    (["searcher=random", "+search.space.train.lr={choice:[1e-4,1e-3]}"], "search.space.train.lr is sampled"),
    (["search.num_samples=2"], "search.num_samples=2 would repeat them"),
    (["search.seeds=[0,1,2,3]"], "search.seeds lists 4 seeds, more than search.max_seeds=3"),
    (["search.max_seeds=0"], "search.max_seeds must be >= 1"),
    (["task.metric=loss"], "task.metric=loss has no per-row score"),
])
def test_racing_with_what_it_cannot_race_is_refused_before_ray(overrides, message, store, capsys):
    code = main(["plan", "search=tiny", "search.racing=true", f"tracking.uri={store['uri']}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert err[0].startswith("peftsweep: error: ")


def test_racing_off_still_accepts_the_same_settings(capsys):
    assert main(["plan", "search=tiny", "searcher=optuna"]) == 0
    assert "Seed racing" not in capsys.readouterr().out


def test_plan_prints_the_worst_case_under_racing(capsys):
    assert main(["plan", "search=tiny", "search.racing=true", "search.max_seeds=2"]) == 0
    assert "at most 6 trials (3 arms x 2); 3 if the first round settles every arm" in capsys.readouterr().out
    assert main(["plan", "search=tiny", "search.racing=true", "search.max_seeds=2", "+search.base_arm=true"]) == 0
    assert "at most 7 trials (3 arms x 2 + the base arm once)" in capsys.readouterr().out  # base trains nothing


@pytest.mark.slow
def test_a_racing_sweep_adds_seeds_only_where_the_decision_is_open(tiny_bert, store):
    from mlflow.tracking import MlflowClient

    from evaluation.runs import trial_table
    from evaluation.verdicts import PRESUMED_SEED_SD, decide
    from sweeps.racing import MlflowOpenArms

    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", "search=tiny", "search.racing=true",
                           "search.max_seeds=2", "train.max_steps=3", *tiny_overrides(tiny_bert, store)],
                          capture_output=True, text=True, cwd=store["dir"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = MlflowClient(store["uri"])
    exp = c.get_experiment_by_name("peftsweep")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get(record.ROLE) == "sweep"]
    children = [r for r in runs if r.data.tags.get(record.ROLE) == "trial"]
    assert all(r.data.tags[record.STATUS] == "ok" for r in children)
    seeds = {}
    for r in children:
        seeds.setdefault(r.data.tags[record.ARM], []).append(int(r.data.params["seed"]))
    assert len(seeds) == 3 and all(0 in s for s in seeds.values())  # every arm ran the first seed
    assert all(len(s) == len(set(s)) <= 2 for s in seeds.values())  # each seed once, at most max_seeds

    # seed 1 ran exactly for the arms the first seed left open, and for full FT beside them
    table = trial_table(c, parent)
    first = table[table["seed"] == 0]
    decision = decide(c, first, "accuracy", 1.0, PRESUMED_SEED_SD)  # report.margin's default
    assert decision.vs_full.get("val"), "the first round must yield validation comparisons"
    assert decision.seed_noise["val"].source == "presumed"  # one seed an arm: racing presumes seed noise
    expected = MlflowOpenArms(None, parent.info.run_id, "accuracy", 1.0, {}, max_seeds=2).open_of(c, first)
    assert expected == open_labels(decision, 2)
    second = {arm for arm, s in seeds.items() if 1 in s}
    assert second - {decision.full_arm} == expected
    if expected:
        assert decision.full_arm in second

    # rounds: no adapter's second seed started before every first-seed trial had ended (full FT may start its
    # second seed in the slot the first round's last trial leaves idle)
    if expected:
        starts = [r.info.start_time for r in children
                  if r.data.params["seed"] == "1" and r.data.tags[record.ARM] != decision.full_arm]
        ends = [r.info.end_time for r in children if r.data.params["seed"] == "0"]
        assert min(starts) >= max(ends)
    assert "seed racing: round 1 done" in proc.stdout

    # the parent records that it raced, its budget, and what it spent of the grid it replaced
    assert parent.data.params["racing"] == "True" and parent.data.params["max_seeds"] == "2"
    assert parent.data.params["n_trials"] == "6"
    assert parent.data.metrics["racing_trials"] == len(children) == sum(map(len, seeds.values()))

    # the report says what racing spent against the grid it replaced, and which arms got which seeds
    from evaluation.report import build_report

    rep = build_report(c, "peftsweep", out_dir=str(store["dir"] / "reports"), log_to_mlflow=False)
    spent = rep["json"]["racing"]
    assert spent["trials"] == len(children) and spent["grid_trials"] == 6 and spent["max_seeds"] == 2
    assert spent["seeds"] == {arm: sorted(s) for arm, s in seeds.items()}
    assert f"Seed racing ran {len(children)} trials of the 6 that 2 seeds an arm would" in rep["markdown"]
    assert parent.data.metrics["racing_grid_trials"] == 6
    assert parent.info.status == "FINISHED"
