"""The search grammar: a nested space of config keys → domains, expanded into trials and Ray param_space.

Leaves of `search.space`:
    3e-4                              fixed value
    [4, 8, 16]                        grid: every value, crossed with the other grid keys
    {grid: [...]}                     the same, spelled out
    {choice: [...]}                   random choice (grid/random searchers sample it; Optuna models it)
    {uniform: [lo, hi]}  {loguniform: [lo, hi]}  {randint: [lo, hi]}   (randint: hi exclusive)
    {derive: "2 * method.r"}          computed from another key of the same trial (alpha = 2·r)
"""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass

from trainers.config import METHOD_KEYS, ConfigError

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint", "derive")
SAMPLED = ("choice", "uniform", "loguniform", "randint")
_DERIVE = re.compile(r"^\s*(?:(?P<pre>[-+0-9.eE]+)\s*\*\s*)?(?P<key>[A-Za-z_][\w.]*)\s*"
                     r"(?:\*\s*(?P<post>[-+0-9.eE]+))?\s*$")


@dataclass(frozen=True)
class Dim:
    key: str  # dotted config key, e.g. method.r
    kind: str  # fixed | one of DOMAINS
    args: object


def flatten(space: dict, prefix: str = "") -> list[Dim]:
    dims = []
    for name, value in (space or {}).items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAINS:
            kind, args = next(iter(value.items()))
            dims.append(Dim(key, kind, args))
        elif isinstance(value, dict):
            dims += flatten(value, key + ".")
        elif isinstance(value, (list, tuple)):
            dims.append(Dim(key, "grid", list(value)))
        else:
            dims.append(Dim(key, "fixed", value))
    return dims


def check(dims: list[Dim], base: dict) -> None:
    """Refuse keys the trial config lacks and malformed domains, before anything runs."""
    for d in dims:
        node = base
        for part in d.key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"search.space.{d.key}: {d.key!r} is not a trial config key")
            node = node[part]
        if d.kind in ("grid", "choice") and (not isinstance(d.args, list) or not d.args):
            raise ConfigError(f"search.space.{d.key}: {d.kind} needs a non-empty list, got {d.args!r}")
        if d.kind in ("uniform", "loguniform", "randint"):
            if not (isinstance(d.args, list) and len(d.args) == 2 and d.args[0] < d.args[1]):
                raise ConfigError(f"search.space.{d.key}: {d.kind} needs [low, high] with low < high, got {d.args!r}")
            if d.kind == "loguniform" and d.args[0] <= 0:
                raise ConfigError(f"search.space.{d.key}: loguniform needs low > 0, got {d.args[0]}")
        if d.kind == "derive":
            m = _DERIVE.match(str(d.args))
            if not m:
                raise ConfigError(f"search.space.{d.key}: derive {d.args!r} is not '<number> * <key>'")
            if m["key"] not in {x.key for x in dims} and not _has(base, m["key"]):
                raise ConfigError(f"search.space.{d.key}: derive refers to unknown key {m['key']!r}")


def _has(tree: dict, dotted: str) -> bool:
    try:
        get(tree, dotted)
        return True
    except KeyError:
        return False


def get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def put(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def apply(base: dict, overrides: dict, dims: list[Dim] = ()) -> dict:
    """base ← dotted overrides, then derived keys (computed from the values this trial ended up with)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        put(out, key, value)
    for d in dims:
        if d.kind == "derive":
            m = _DERIVE.match(str(d.args))
            factor = float(m["pre"] or 1) * float(m["post"] or 1)
            source = get(out, m["key"])
            value = source * factor
            put(out, d.key, int(value) if isinstance(source, int) and float(value).is_integer() else value)
    return out


def grid_points(dims: list[Dim]) -> list[dict]:
    grid = [d for d in dims if d.kind in ("grid", "fixed")]
    values = [d.args if d.kind == "grid" else [d.args] for d in grid]
    return [dict(zip([d.key for d in grid], combo)) for combo in itertools.product(*values)]


# The base arm: the untouched base model, scored without training (search.base_arm).
BASE_ARM = {"method.name": "base", "quant.mode": "none"}


def effective(trial: dict) -> dict:
    """A trial dict without what its method does not read and without tracking: one configuration."""
    reads = METHOD_KEYS[trial["method"]["name"]]
    method = {k: v for k, v in trial["method"].items() if k == "name" or k in reads}
    return {**{k: v for k, v in trial.items() if k != "tracking"}, "method": method}


def _effective_key(trial: dict) -> str:
    import json

    return json.dumps(effective(trial), sort_keys=True, default=str)


def arms(search, base: dict) -> list[dict]:
    """Dotted overrides of every arm (seed excluded), the full-FT baseline first: it is the longest
    trial, so starting it first shortens the sweep's makespan. Grid points that resolve to the same
    configuration (IA3 at r=8 and r=16: it has no rank) are kept once."""
    dims = flatten(search.space)
    check(dims, base)
    candidates = [dict(p, __arm__="adapter") for p in grid_points(dims)]
    if search.full_ft_arm:
        candidates.insert(0, dict(flatten_values(search.baseline), __arm__="baseline"))
    if getattr(search, "base_arm", False):
        candidates.append(dict(BASE_ARM, __arm__="base"))
    sampled = representatives(dims)
    seen, out = set(), []
    for arm in candidates:
        key = _effective_key(resolve_trial(base, search, arm, search.seeds[0], sampled))
        if key not in seen:
            seen.add(key)
            out.append(arm)
    return out


def flatten_values(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (tree or {}).items():
        if isinstance(v, dict):
            out.update(flatten_values(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolve_trial(base: dict, search, arm: dict, seed: int, sampled: dict | None = None) -> dict:
    """The full trial dict for one arm × seed (× sampled values). Baseline arms take no search values."""
    dims = flatten(search.space)
    overrides = {k: v for k, v in arm.items() if k != "__arm__"}
    if arm.get("__arm__") in ("baseline", "base"):
        return apply(base, {**overrides, "train.seed": seed})
    return apply(base, {**(sampled or {}), **overrides, "train.seed": seed}, dims)


def expand(search, base: dict) -> list[dict]:
    """Every trial a grid sweep would run (sampled domains left as their spec), for plan and validation."""
    arm_list = arms(search, base)  # checks the space first
    draw = representatives(flatten(search.space))
    return [resolve_trial(base, search, arm, seed, draw) for arm in arm_list for seed in search.seeds]


def representatives(dims: list[Dim]) -> dict:
    """{key: a value inside its domain} for every sampled key: plan and validation type-check with it."""
    return {d.key: _representative({d.kind: d.args}) for d in dims if d.kind in SAMPLED}


def _representative(spec: dict):
    """A value inside a sampled domain, so validation can type-check the trial (low end of the range)."""
    kind, args = next(iter(spec.items()))
    return args[0]


def param_space(search, searcher: str, order: list[str]) -> dict:
    """Ray Tune param_space: `arm` (a planned label, sweeps/plan.py), `seed`, and sampled keys by dotted
    name. `order`: the arm labels in the order trials should start (the plan's, longest first)."""
    from ray import tune

    dims = flatten(search.space)
    space = {}
    for d in dims:
        if d.kind == "choice":
            space[d.key] = tune.choice(d.args)
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(*d.args)
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(*d.args)
        elif d.kind == "randint":
            space[d.key] = tune.randint(*d.args)
    all_arms = list(order)
    if searcher == "optuna":
        # Optuna models categorical choices, not grids: arms and seeds become choices it samples.
        space["arm"] = tune.choice(all_arms)
        space["seed"] = tune.choice(list(search.seeds))
    else:
        space["arm"] = tune.grid_search(all_arms)
        space["seed"] = tune.grid_search(list(search.seeds))
    return space
