"""The search grammar: grids cross, derived values follow their source, the baseline comes first,
seeds repeat arms, malformed domains are refused, and Ray receives the same trials."""
import pytest

from sweeps import space
from sweeps.config import SearchConfig, load, trial_dict
from sweeps.plan import build_plan
from trainers.config import ConfigError, trial_config_from_dict


def _base():
    return trial_dict(load([]))


def test_grid_crosses_and_derives():
    s = SearchConfig(space={"method": {"r": [2, 8], "target_modules": ["attention_qv", "mlp"],
                                       "alpha": {"derive": "3 * method.r"}}}, full_ft_arm=False, seeds=[0, 1])
    trials = space.expand(s, _base())
    assert len(trials) == 2 * 2 * 2
    assert {(t["method"]["r"], t["method"]["alpha"]) for t in trials} == {(2, 6), (8, 24)}
    assert sorted({t["train"]["seed"] for t in trials}) == [0, 1]


def test_baseline_arm_first_and_untouched_by_the_adapter_space():
    s = SearchConfig(space={"method": {"r": [4]}, "train": {"lr": [0.01]}}, seeds=[3])
    trials = space.expand(s, _base())
    assert trials[0]["method"]["name"] == "full" and trials[0]["train"]["lr"] == pytest.approx(1e-4)
    assert trials[1]["method"]["r"] == 4 and trials[1]["train"]["lr"] == 0.01
    assert all(t["train"]["seed"] == 3 for t in trials)


def test_fixed_values_and_postfix_derive():
    s = SearchConfig(space={"method": {"dropout": 0.2, "r": [4], "alpha": {"derive": "method.r * 0.5"}}},
                     full_ft_arm=False)
    (t,) = space.expand(s, _base())
    assert t["method"]["dropout"] == 0.2 and t["method"]["alpha"] == 2


@pytest.mark.parametrize("bad,message", [
    ({"method": {"rank": [4]}}, "'method.rank' is not a trial config key"),
    ({"method": {"r": {"choice": []}}}, "choice needs a non-empty list"),
    ({"train": {"lr": {"loguniform": [0, 1e-3]}}}, "loguniform needs low > 0"),
    ({"train": {"lr": {"uniform": [1e-3, 1e-4]}}}, "low < high"),
    ({"method": {"alpha": {"derive": "r ** 2"}}}, "is not '<number> \\* <key>'"),
    ({"method": {"alpha": {"derive": "2 * method.rank"}}}, "unknown key 'method.rank'"),
])
def test_malformed_space_is_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        space.expand(SearchConfig(space=bad), _base())


def test_ray_param_space_matches_the_expansion():
    from ray.tune.search.variant_generator import generate_variants

    cfg = load([])
    base = trial_dict(cfg)
    plan = build_plan(cfg)
    variants = [v for _, v in generate_variants(space.param_space(cfg.search, "grid", plan.order))]
    via_ray = sorted((t["method"]["name"], t["method"]["r"], str(t["method"]["target_modules"]))
                     for t in (plan.trial_dict(v["arm"], v["seed"]) for v in variants))
    direct = sorted((t["method"]["name"], t["method"]["r"], str(t["method"]["target_modules"]))
                    for t in space.expand(cfg.search, base))
    assert via_ray == direct and len(direct) == 7


def test_sampled_domain_reaches_the_trial():
    from ray.tune.search.variant_generator import generate_variants

    cfg = load(["+search.space.train.lr={loguniform:[1e-4,1e-2]}", "search.full_ft_arm=false", "search.racing=false"])
    base = trial_dict(cfg)
    plan = build_plan(cfg)
    assert all(arm.endswith("-lr~") for arm in plan.order)  # the plan cannot know the drawn value
    trials = [plan.trial_dict(v["arm"], v["seed"], {"train.lr": v["train.lr"]})
              for _, v in generate_variants(space.param_space(cfg.search, "grid", plan.order))]
    lrs = [t["train"]["lr"] for t in trials]
    assert len(lrs) == 6 and all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) > 1
    for v in lrs:
        trial_config_from_dict({**base, "train": {**base["train"], "lr": v}})
    # each trial records its drawn value in its label: two draws of one arm are two configurations
    recorded = [plan.label_of(arm, t) for arm, t in zip(plan.order * 3, trials)]
    assert len(set(recorded)) == len(set(map(repr, lrs))) and all("-lr0." in label for label in recorded)


def test_grid_points_that_are_one_configuration_train_once():
    """IA3 reads no rank: method x r crosses to 2 LoRA arms and 1 IA3 arm, not 2."""
    s = SearchConfig(space={"method": {"name": ["lora", "ia3"], "r": [8, 16],
                                       "alpha": {"derive": "2 * method.r"}}}, full_ft_arm=False, seeds=[0, 1])
    trials = space.expand(s, _base())
    assert sorted((t["method"]["name"], t["method"]["r"]) for t in trials if t["train"]["seed"] == 0) == \
        [("ia3", 8), ("lora", 8), ("lora", 16)]
    assert len(trials) == 3 * 2
    assert len(space.arms(s, _base())) == 3


def test_trials_start_most_expensive_first():
    """Full FT (6 FLOPs per weight) before all-linear LoRA before q,v LoRA; larger ranks first among equals."""
    cfg = load([])
    plan = build_plan(cfg)
    order = plan.order
    assert order[0] == "full-lr0.0001"
    assert [a.split("-")[1] for a in order[1:4]] == ["r16", "r8", "r4"] and all("all_linear" in a for a in order[1:4])
    assert all("attention_qv" in a for a in order[4:])
    assert [t.arm for t in plan.trials] == order  # one seed: the trials start in arm order
    grid = space.param_space(cfg.search, "grid", order)["arm"]
    assert list(grid["grid_search"]) == order
