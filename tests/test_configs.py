"""Every shipped config option and search space composes, binds to the schema and expands into valid
trial configs — without loading weights or training."""
from pathlib import Path

import pytest

from sweeps import space
from sweeps.config import conf_dir, load, trial_dict
from trainers.config import ConfigError, trial_config_from_dict

GROUPS = sorted(p.name for p in Path(conf_dir()).iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(conf_dir()) / g).glob("*.yaml"))]
# Options that deliberately leave a mandatory value (???) for the user to fill.
NEEDS = {("model", "hub"): ["model.path=org/some-model"], ("cluster", "remote"): ["cluster.storage_path=/shared/ray"]}


def test_every_group_is_known():
    assert set(GROUPS) == {"model", "task", "train", "method", "quant", "search", "searcher", "scheduler",
                           "cluster", "tracking", "promote", "report"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_expands(group, option):
    cfg = load([f"{group}={option}", *NEEDS.get((group, option), [])])
    trials = space.expand(cfg.search, trial_dict(cfg))
    assert trials, "a sweep must have at least one trial"
    for t in trials:
        trial_config_from_dict(t)  # raises on any schema violation


def test_default_sweep_is_six_adapters_plus_full_ft():
    cfg = load([])
    trials = [trial_config_from_dict(t) for t in space.expand(cfg.search, trial_dict(cfg))]
    assert trials[0].method.name == "full" and trials[0].train.lr == pytest.approx(1e-4)
    adapters = trials[1:]
    assert sorted((t.method.r, t.method.target_modules) for t in adapters) == sorted(
        (r, m) for r in (4, 8, 16) for m in ("attention_qv", "all_linear"))
    assert all(t.method.alpha == 2 * t.method.r for t in adapters)
    assert all(t.train.lr == pytest.approx(1e-3) for t in adapters)


def test_method_option_sets_its_own_learning_rate():
    assert load(["method=full"]).trial.train.lr == pytest.approx(1e-4)
    assert load(["method=lora"]).trial.train.lr == pytest.approx(1e-3)


def test_the_default_yaml_states_the_dataclass_defaults():
    """One source of defaults: composing the default config gives exactly the schema's defaults (a search
    option's own content, its space, aside)."""
    import dataclasses

    from sweeps.config import SweepConfig, compose
    from trainers.config import TrialConfig

    cfg = load([])
    assert cfg.trial == TrialConfig()
    for field in dataclasses.fields(SweepConfig):
        if field.name in ("trial", "name", "direct_keys"):
            continue
        composed, default = getattr(cfg, field.name), type(getattr(cfg, field.name))()
        if field.name == "search":
            composed = dataclasses.replace(composed, space={})
        assert composed == default, field.name
    assert compose([])["tracking"]["outage_timeout_s"] == TrialConfig().tracking.outage_timeout_s


def test_unknown_key_in_a_group_is_refused():
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load(["train.lrr=3"])
