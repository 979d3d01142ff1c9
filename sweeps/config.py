"""Compose the Hydra config and bind it to the sweep schema (dataclasses, checked at load).

The trial part (model, task, method, quant, train, tracking) is `trainers.config.TrialConfig`; the
sweep adds search, searcher, scheduler, cluster and promote.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from trainers.composition import compose, conf_dir  # noqa: F401 - re-exported for callers
from trainers.config import ConfigError, TrialConfig, _build, trial_config_from_dict

TRIAL_SECTIONS = ("model", "task", "method", "quant", "train", "tracking")


def _baseline_default() -> dict:
    return {"method": {"name": "full"}, "train": {"lr": 1e-4}, "quant": {"mode": "none"}}


@dataclass
class SearchConfig:
    name: str = "default"
    # Nested like the trial config; a leaf is a value, a list (grid) or a domain
    # ({choice|uniform|loguniform|randint|grid: ...} or {derive: "2 * method.r"}). See sweeps/space.py.
    space: dict = field(default_factory=dict)
    full_ft_arm: bool = True  # the baseline every adapter is compared with; costs one full FT per seed
    baseline: dict = field(default_factory=_baseline_default)  # overrides for the full-FT arm
    seeds: list = field(default_factory=lambda: [0])  # every arm repeats per seed: time x len(seeds)
    num_samples: int = 1  # random/optuna: configurations drawn (per grid point for random)
    metric: Optional[str] = None  # default val_<task.metric>
    mode: str = "max"

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("search.seeds is empty: give at least one seed")
        if self.num_samples < 1:
            raise ConfigError(f"search.num_samples must be >= 1, got {self.num_samples}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"search.mode must be max or min, got {self.mode!r}")


@dataclass
class SearcherConfig:
    name: str = "grid"  # grid | random | optuna

    def __post_init__(self) -> None:
        if self.name not in ("grid", "random", "optuna"):
            raise ConfigError(f"searcher.name={self.name!r} is not grid, random or optuna")


@dataclass
class SchedulerConfig:
    name: str = "fifo"  # fifo | asha
    max_t: int = 100  # ASHA: the most `step`s a trial may run
    grace_period: int = 10  # ASHA: steps before a trial can be stopped
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        if self.name not in ("fifo", "asha"):
            raise ConfigError(f"scheduler.name={self.name!r} is not fifo or asha")


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: start local Ray; "auto" or "ray://host:10001" to attach
    num_cpus: Optional[int] = None  # local Ray only; None = all cores
    num_gpus: Optional[int] = None  # local Ray only; logical GPUs can be declared on a CPU box
    cpus_per_trial: float = 1  # also the trial's torch threads
    # GPUs per trial: a number (1, 0.5, ...) or "auto": each trial gets the fraction of a GPU its predicted
    # peak memory needs (trainers/estimate.py), so Ray packs trials by memory and never oversubscribes.
    gpus_per_trial: Any = 0
    gpu_memory_gb: Optional[float] = None  # capacity per GPU for "auto"; None: read from the local GPU
    gpu_headroom: float = 0.9  # "auto" plans to this share of gpu_memory_gb (fragmentation, CUDA context)
    max_concurrent_trials: Optional[int] = None
    storage_path: str = "ray_results"  # must be shared storage (s3://, NFS) on a multi-node cluster
    object_store_memory_mb: Optional[int] = 256  # trials pass no big objects; Ray's default takes 30 % of RAM
    include_dashboard: Optional[bool] = None
    # Ray retries a trial whose process died or raised, up to this many times (preemptible nodes: 2-3).
    # Each retry is a new MLflow child run; the failed attempt stays recorded.
    max_failures: int = 0

    def __post_init__(self) -> None:
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"cluster.cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial != "auto" and (isinstance(self.gpus_per_trial, str) or self.gpus_per_trial < 0):
            raise ConfigError(f"cluster.gpus_per_trial must be a number >= 0 or 'auto', got {self.gpus_per_trial!r}")
        if not 0 < self.gpu_headroom <= 1:
            raise ConfigError(f"cluster.gpu_headroom must be in (0, 1], got {self.gpu_headroom}")


PROMOTION_RULES = ("best", "cheapest_within", "best_under_budget")


@dataclass
class PromoteConfig:
    registered_model: Optional[str] = None  # None: "<task>-<model>" read from the sweep's parent run
    alias: str = "champion"
    # best: highest mean validation metric among adapters; cheapest_within: the lowest `cost` among adapters
    # within `within_points` of full FT's validation metric; best_under_budget: the best adapter whose peak
    # memory fits `memory_budget_gb`.
    rule: str = "best"
    max_delta: Optional[float] = None  # gate: refuse when the winner's test metric trails full FT by more points
    within_points: float = 1.0  # cheapest_within: allowed distance below full FT (validation, points)
    cost: str = "peak_mem"  # cheapest_within: peak_mem | device_hours
    memory_budget_gb: Optional[float] = None  # best_under_budget: the arm's mean peak memory must fit this
    tolerance_points: float = 0.5  # reload check: reproduced metric must match the logged one this closely

    def __post_init__(self) -> None:
        if self.rule not in PROMOTION_RULES:
            raise ConfigError(f"promote.rule={self.rule!r} is not one of {', '.join(PROMOTION_RULES)}")
        if self.cost not in ("peak_mem", "device_hours"):
            raise ConfigError(f"promote.cost={self.cost!r} is not peak_mem or device_hours")
        if self.rule == "best_under_budget" and not (self.memory_budget_gb and self.memory_budget_gb > 0):
            raise ConfigError("promote.rule=best_under_budget needs promote.memory_budget_gb > 0")


@dataclass
class SweepConfig:
    trial: TrialConfig
    search: SearchConfig
    searcher: SearcherConfig
    scheduler: SchedulerConfig
    cluster: ClusterConfig
    promote: PromoteConfig
    name: str = "sweep"

    @property
    def metric(self) -> str:
        return self.search.metric or f"val_{self.trial.task.metric}"


_SECTIONS = {"search": SearchConfig, "searcher": SearcherConfig, "scheduler": SchedulerConfig,
             "cluster": ClusterConfig, "promote": PromoteConfig}


def sweep_config_from_dict(data: dict) -> SweepConfig:
    data = dict(data)
    trial = trial_config_from_dict({k: data.pop(k) for k in (*TRIAL_SECTIONS, "output_dir") if k in data})
    sections = {k: _build(cls, data.pop(k, None), k) for k, cls in _SECTIONS.items()}
    name = data.pop("name", "sweep")
    data.pop("hydra", None)
    if data:
        raise ConfigError(f"unknown top-level config key {sorted(data)[0]!r}")
    return SweepConfig(trial=trial, name=name, **sections)


def load(overrides: list[str] | None = None) -> SweepConfig:
    return sweep_config_from_dict(compose(overrides))


def trial_dict(cfg: SweepConfig) -> dict:
    return dataclasses.asdict(cfg.trial)


def as_dict(cfg: SweepConfig) -> dict:
    out = {k: v for k, v in dataclasses.asdict(cfg.trial).items()}
    for k in _SECTIONS:
        out[k] = dataclasses.asdict(getattr(cfg, k))
    out["name"] = cfg.name
    return out


