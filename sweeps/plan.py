"""The sweep's plan, computed once: every trial as a planned record that `peftsweep plan` prints, the runner
orders and sizes, and each Ray trial looks up (it travels to the workers with the trainable).

A planned trial carries its config, its arm label, its predicted peak memory and parameter counts and, when
trials are packed onto GPUs, its GPU share. Every problem with any trial (and with the sweep as a whole) is
gathered first and raised once, before Ray starts.

Arm labels are built from every trial key whose value varies across the sweep's arms (the seed aside), so
two configurations never share a label and the report never merges them: a sweep over r and modules reads
`lora-r8-a16-attention_qv-lr0.001`, one over batch size adds `bs16`. A model or task is named by its
`name` when that already tells its trials apart (not also by its path). Keys drawn from a sampled domain
read `lr~` in the plan; each trial's recorded label carries the value it drew.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

from sweeps import space
from sweeps.config import SweepConfig, racing_problem, trial_dict
from trainers.config import ConfigError, TrialConfig, trial_config_from_dict
from trainers.record import EXECUTION_KEYS

# Label order: the method first, then what users sweep most, then anything else that varies (sorted).
_LEAD = ("model.name", "task.name", "method.r", "method.alpha", "method.target_modules", "quant.mode",
         "quant.double_quant", "train.lr", "train.batch_size")
# How the common keys read in a label; any other key reads `<last part>=<value>`.
_FORMAT = {"method.r": "r{}", "method.alpha": "a{}", "method.target_modules": "{}", "quant.mode": "{}",
           "train.lr": "lr{}", "train.batch_size": "bs{}", "model.name": "{}", "task.name": "{}",
           "quant.double_quant": "dq={}"}
# repeats of one arm differ only in the seed; where and how a trial runs (workers, checkpoints) is not the arm
_NOT_IDENTITY = ("train.seed", *(f"{section}.{key}" for section, keys in EXECUTION_KEYS.items() for key in keys))


@dataclass
class PlannedTrial:
    arm: str
    seed: int
    config: TrialConfig
    targets: int  # adapted modules (0: full fine-tuning)
    trainable: int
    total: int
    predicted_gb: float  # peak host RSS on CPU, allocated VRAM on CUDA (trainers/estimate.py)
    device: str
    train_flops: float
    gpu_share: float | None = None  # cluster.gpus_per_trial=auto: the fraction of a GPU Ray reserves
    predicted_gpu_gb: float | None = None
    workers: int = 1  # processes the trial spans (train.workers, auto resolved); memory figures are per worker
    strategy: str = "single"  # single | ddp | fsdp


@dataclass
class Plan:
    base: dict  # the trial config every arm overrides
    search: object  # SearchConfig
    arms: dict  # {label: arm overrides}, in start order (most training FLOPs first)
    label_keys: tuple  # the dotted keys that tell arms apart, in label order
    sampled: tuple  # dotted keys drawn from a sampled domain per trial
    trials: list = field(default_factory=list)
    grid_order: list = field(default_factory=list)  # the labels in the search space's own order

    @property
    def order(self) -> list[str]:
        return list(self.arms)

    @property
    def ray_ids(self) -> dict:
        """{short id: label}, listed in start order. Ray's progress table keeps only a value's last ~20
        characters, which would cut `lora-r16-a32-attention_qv-lr0.001` to its tail; it shows `arm03`, and
        the sweep prints this legend first. An id numbers the arm's place in the search space, which the
        config alone fixes, so a resumed sweep maps every id to the same configuration."""
        number = {label: i for i, label in enumerate(self.grid_order or self.arms, 1)}
        return {f"arm{number[label]:02d}": label for label in self.arms}

    def legend(self) -> str:
        return "\n".join(f"  {short}  {label}" for short, label in self.ray_ids.items())

    def label(self, arm: str) -> str:
        """A planned label from itself or its Ray id."""
        label = self.ray_ids.get(arm, arm)
        if label not in self.arms:
            raise ConfigError(f"arm {arm!r} is not in this sweep's plan (a sweep started by another peftsweep "
                              "version names its arms differently: start it anew)")
        return label

    def trial_dict(self, arm: str, seed: int, drawn: dict | None = None) -> dict:
        """The full trial config of one planned arm (label or Ray id) × seed, with the values Ray drew for
        sampled keys."""
        draw = {**space.representatives(space.flatten(self.search.space)), **(drawn or {})}
        return space.resolve_trial(self.base, self.search, self.arms[self.label(arm)], seed, draw)

    def label_of(self, arm: str, trial: dict) -> str:
        """The label a trial records: its arm's planned one, with the values it drew for sampled keys (the
        full-FT baseline draws none)."""
        planned = self.label(arm)
        if not self.sampled or self.arms[planned].get("__arm__") in ("baseline", "base"):
            return planned
        _, hash_, number = planned.partition("#")
        return arm_label(trial, self.label_keys, self.sampled, drawn=True) + (hash_ + number)

    def predicted_host_gb(self, arm: str) -> float:
        """The arm's predicted peak host RSS (CPU trials reserve it); its first seed's, as every seed's."""
        return next(t.predicted_gb for t in self.trials if t.arm == self.label(arm))

    def workers(self, arm: str) -> int:
        return next((t.workers for t in self.trials if t.arm == self.label(arm)), 1)

    def gpu_share(self, arm: str) -> float | None:
        return next((t.gpu_share for t in self.trials if t.arm == self.label(arm)), None)

    def bind_tracking(self, tracking) -> None:
        """Point every trial at the sweep's parent run once it exists (the plan is made before it)."""
        self.base = {**self.base, "tracking": dataclasses.asdict(tracking)}
        for t in self.trials:
            t.config.tracking = dataclasses.replace(tracking)


def arm_label(trial: dict, keys, sampled=(), drawn: bool = False) -> str:
    """`<method>-<part>-<part>...` from the trial's values of `keys`; a key its method does not read is left
    out (full FT has no rank), and so is quantization `none`. Sampled keys read `<key>~` unless `drawn`."""
    values = space.flatten_values(space.effective(trial))
    parts = [trial["method"]["name"]]
    lasts = [k.split(".")[-1] for k in keys]
    for key in keys:
        if key == "method.name" or key not in values:
            continue
        value = values[key]
        if key in sampled and not drawn:
            parts.append(_render(key, "~", lasts) if key not in _FORMAT else _FORMAT[key].format("~"))
            continue
        if key == "quant.mode" and value == "none":
            continue
        parts.append(_render(key, value, lasts))
    return "-".join(parts)


def _render(key: str, value, lasts: list[str]) -> str:
    text = _value(value)
    if key in _FORMAT:
        return _FORMAT[key].format(text)
    last = key.split(".")[-1]
    return f"{key if lasts.count(last) > 1 else last}={text}"


def _value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)


def label_keys(trials: list[dict], sampled=()) -> tuple:
    """The keys whose values differ across `trials` (one per arm), seed aside, plus every sampled key."""
    flat = [space.flatten_values(space.effective(t)) for t in trials]
    keys = sorted({k for f in flat for k in f} - set(_NOT_IDENTITY))
    varying = [k for k in keys if k in sampled or len({repr(f[k]) for f in flat if k in f}) > 1]
    # a model or task reads as its name when the name alone tells its trials apart
    for section in ("model", "task"):
        name = f"{section}.name"
        if name in varying:
            by_name = {}
            for f in flat:
                by_name.setdefault(repr(f.get(name)), set()).add(repr(sorted(
                    (k, v) for k, v in f.items() if k.startswith(section + ".") and k in varying)))
            if all(len(v) == 1 for v in by_name.values()):
                varying = [k for k in varying if not k.startswith(section + ".") or k == name]
    lead = [k for k in _LEAD if k in varying]
    return tuple(lead + [k for k in varying if k not in lead])


def _direct_conflicts(cfg: SweepConfig) -> list[str]:
    """A key set on the command line that the search space also sets would be silently overridden."""
    dims = [d.key for d in space.flatten(cfg.search.space)]
    out = []
    for key in cfg.direct_keys:
        for dim in dims:
            if key == dim or dim.startswith(key + ".") or key.startswith(dim + "."):
                out.append(f"{key} is set directly, but search.space.{dim} also sets it and the space wins: "
                           f"drop {key}=..., or set search.space.{dim} instead")
    return out


def _metric_problems(cfg: SweepConfig, trials) -> list[str]:
    """The sweep ranks by a result its trials report (trainers.record.TASK_METRICS): any other name would let
    every trial train to its end and then leave Ray nothing to rank by."""
    from trainers.record import ranked_metrics

    out = []
    for task_type in sorted({t.task.type for t in trials}):
        known = ranked_metrics(task_type)
        if cfg.metric not in known:
            out.append(f"search.metric={cfg.metric!r} is not a result {task_type} trials report ({', '.join(known)})")
    return out


def _scheduler_problems(cfg: SweepConfig, trials) -> list[str]:
    trials = list(trials)
    sft = [t for t in trials if t.task.type == "sft"]
    if cfg.scheduler.name == "asha" and sft and cfg.metric.removeprefix("val_") not in ("loss", "perplexity"):
        # generation is scored once, at the end; an eval pass measures only the answers' loss
        return [f"scheduler=asha ranks sft trials at their eval passes, which measure val_loss and val_perplexity "
                f"only: set search.metric=val_loss (not {cfg.metric})"]
    if cfg.scheduler.name == "asha" and not any(t.train.eval_every_steps for t in trials):
        # ASHA ranks trials at intermediate results; without eval passes the only result is the last one
        # (a trial without them, e.g. a baseline the space does not reach, is simply never stopped)
        return [f"scheduler=asha needs train.eval_every_steps (ASHA can only stop a trial at an evaluation; "
                f"e.g. train.eval_every_steps={cfg.scheduler.grace_period}, the grace period)"]
    return []


def build_plan(cfg: SweepConfig) -> Plan:
    """Expand, validate, predict and order every trial of the sweep; ConfigError lists every problem."""
    from trainers import predict_train_flops, predict_trial, validate_trial

    base = trial_dict(cfg)
    search = cfg.search
    dims = space.flatten(search.space)
    sampled = tuple(d.key for d in dims if d.kind in space.SAMPLED)
    draw = space.representatives(dims)
    arm_overrides = space.arms(search, base)  # refuses a malformed space first
    racing = racing_problem(cfg)
    if racing:
        raise ConfigError(racing)
    first = [space.resolve_trial(base, search, arm, search.seeds[0], draw) for arm in arm_overrides]
    keys = label_keys([t for t, arm in zip(first, arm_overrides) if arm["__arm__"] != "base"], sampled)
    labels = _unique(["base" if arm["__arm__"] == "base" else
                      arm_label(t, keys, () if arm["__arm__"] == "baseline" else sampled)
                      for t, arm in zip(first, arm_overrides)])

    configs = {(label, seed): trial_config_from_dict(space.resolve_trial(base, search, arm, seed, draw))
               for label, arm in zip(labels, arm_overrides) for seed in search.seeds}
    problems = (_direct_conflicts(cfg) + _metric_problems(cfg, configs.values())
                + _scheduler_problems(cfg, configs.values()))
    for trial in configs.values():
        problems += [p for p in validate_trial(trial) if p not in problems]
    problems += _resolve_workers(cfg, labels, arm_overrides, configs)
    if problems:
        raise ConfigError("\n".join(problems))

    trials = []
    for label in labels:
        row = predict_trial(configs[(label, search.seeds[0])])  # memory and counts do not depend on the seed
        flops = predict_train_flops(configs[(label, search.seeds[0])])
        share = gpu_gb = None
        if cfg.cluster.gpus_per_trial == "auto":
            from sweeps.packing import trial_gpu_request

            share, gpu_gb = trial_gpu_request(dataclasses.asdict(configs[(label, search.seeds[0])]), cfg.cluster)
        for seed in search.seeds:
            trials.append(PlannedTrial(arm=label, seed=seed, config=configs[(label, seed)], targets=row["targets"],
                                       trainable=row["trainable"], total=row["total"],
                                       predicted_gb=row["predicted_gb"], device=row["device"], train_flops=flops,
                                       gpu_share=share, predicted_gpu_gb=gpu_gb, workers=row["workers"],
                                       strategy=row["strategy"]))
    problems = [_no_fit(t, cfg) for t in trials if t.gpu_share is not None and t.gpu_share > 1 and t.seed == search.seeds[0]]
    if problems:
        raise ConfigError("\n".join(problems))
    # Most training FLOPs first: a sweep does not end waiting on one long trial started last (bench/packing.py,
    # 12 mixed trials on 4 GPUs: 0.68 of the ideal makespan in grid order, 0.88 longest first). Ties keep grid order.
    flops = {t.arm: t.train_flops for t in trials}
    order = sorted(labels, key=lambda label: -flops[label])
    trials.sort(key=lambda t: order.index(t.arm))
    by_label = dict(zip(labels, arm_overrides))
    return Plan(base=base, search=search, arms={label: by_label[label] for label in order}, grid_order=labels,
                label_keys=keys, sampled=sampled, trials=trials)


def _resolve_workers(cfg: SweepConfig, labels: list, arm_overrides: list, configs: dict) -> list[str]:
    """train.workers=auto becomes the fewest workers whose predicted per-worker peak fits one device, written
    into the arm's overrides (every trial of the arm, resumed ones included, resolves the same), or a problem."""
    from sweeps.packing import choose_workers

    from sweeps.packing import workers_available

    problems = []
    for label, arm in zip(labels, arm_overrides):
        asked = configs[(label, cfg.search.seeds[0])].train.workers
        if asked != "auto":
            if asked > workers_available(cfg.cluster):
                problems.append(f"{label}: train.workers={asked}, but a trial can span at most "
                                f"{workers_available(cfg.cluster)} (cluster.max_workers_per_trial)")
            continue
        workers, why = choose_workers(configs[(label, cfg.search.seeds[0])], cfg.cluster)
        if why:
            problems.append(f"{label}: {why}")
            continue
        arm["train.workers"] = workers
        for seed in cfg.search.seeds:
            c = configs[(label, seed)]
            configs[(label, seed)] = dataclasses.replace(c, train=dataclasses.replace(c.train, workers=workers))
    return problems


def _no_fit(t: PlannedTrial, cfg: SweepConfig) -> str:
    from sweeps.packing import gpu_capacity_gb

    return (f"{t.arm}: predicted peak {t.predicted_gpu_gb:.1f} GB does not fit one GPU "
            f"({gpu_capacity_gb(cfg.cluster):.0f} GB x {cfg.cluster.gpu_headroom} headroom); "
            "lower train.batch_size or use quant=nf4")


def _unique(labels: list[str]) -> list[str]:
    """Labels differ whenever configurations do; should two renderings still coincide (two floats equal to
    six digits), number them rather than merge two configurations in the report."""
    seen: dict = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def seed_pool(seeds: Iterable[int], max_seeds: int) -> list[int]:
    """The seeds an arm may get, in the order it gets them: search.seeds as listed, then the integers after
    the last one (skipping any already listed), up to `max_seeds`."""
    pool = list(dict.fromkeys(int(s) for s in seeds))[:max_seeds]
    nxt = pool[-1] + 1
    while len(pool) < max_seeds:
        if nxt not in pool:
            pool.append(nxt)
        nxt += 1
    return pool


def worst_case(cfg: SweepConfig, plan: Plan) -> int:
    """The trials a race can spend at most: every arm at max_seeds (the grid racing replaces), but the base arm
    once (it is never re-seeded)."""
    pool = seed_pool(cfg.search.seeds, cfg.search.max_seeds)
    base = sum(plan.trial_dict(ray_id, pool[0])["method"]["name"] == "base" for ray_id in plan.ray_ids)
    return (len(plan.arms) - base) * cfg.search.max_seeds + base
