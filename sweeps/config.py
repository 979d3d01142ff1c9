"""Compose the Hydra config tree (`conf/`) and bind it to the sweep schema (dataclasses, checked at load).

The trial part (model, task, method, quant, train, tracking) is `trainers.config.TrialConfig`; the
sweep adds search, searcher, scheduler, cluster and promote. Hydra lives here only: trainers never sees it.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from trainers.config import (RETIRED_KEYS, TRIAL_SECTIONS, ConfigError, TrialConfig, build_section,
                             trial_config_from_dict)


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
    mode: Optional[str] = None  # default: min for a loss or perplexity, else max (trainers.record.metric_mode)
    # Also score the untouched base model (no training): did fine-tuning help at all? Costs one evaluation.
    base_arm: bool = False
    # Seed racing (sweeps/racing.py): the first seed of every arm, then further seeds only for arms whose
    # verdict against full FT (or tie with the best arm) is still open. Rounds run one after another, so the
    # sweep waits at each round's slowest trial; it saves every seed a decided arm would have spent.
    racing: bool = True  # a searcher that samples (random, optuna) cannot race: set it false there
    # racing: the most seeds an arm gets (search.seeds, then the next integers). The worst case, every arm
    # open to the end, costs arms x max_seeds trials: what the grid over that many seeds would.
    max_seeds: int = 2

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("search.seeds is empty: give at least one seed")
        if self.max_seeds < 1:
            raise ConfigError(f"search.max_seeds must be >= 1, got {self.max_seeds}")
        if self.racing and len(self.seeds) > self.max_seeds:
            raise ConfigError(f"search.seeds lists {len(self.seeds)} seeds, more than search.max_seeds="
                              f"{self.max_seeds} lets racing use: raise search.max_seeds or shorten search.seeds")
        if self.num_samples < 1:
            raise ConfigError(f"search.num_samples must be >= 1, got {self.num_samples}")
        if self.mode is not None and self.mode not in ("max", "min"):
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
    # Ray retries a trial whose process died or raised, up to this many times (preemptible nodes: 2-3). With
    # train.checkpoint_every_steps a retry continues from its last checkpoint in the same MLflow run; without,
    # each retry is a new child run and the failed attempt stays recorded.
    max_failures: int = 0
    # train.workers=auto plans up to this many workers per trial (null: local Ray's GPUs, or on CPU its
    # cores / cpus_per_trial); a trial spans workers only on a GPU node pool or several CPU cores
    max_workers_per_trial: Optional[int] = None
    # A trial slot's process runs the slot's next trial (Tune's reuse_actors): Ray's actor start and the
    # torch / transformers / peft imports are paid once a slot, not once a trial (~6 s of a ~70 s MiniLM trial
    # on 2 cores). Every trial still starts from released caches and measures its own memory window. FIFO
    # only: a trial a scheduler stops is still recording itself when Tune hands its process on.
    reuse_processes: bool = True

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
    registered_model: Optional[str] = None  # None: the sweep's name (sweep_name), read from its parent run
    alias: str = "champion"
    # best: highest mean validation metric among adapters; cheapest_within: the lowest `cost` among adapters
    # within `within_points` of full FT's validation metric; best_under_budget: the best adapter whose peak
    # memory fits `memory_budget_gb`.
    rule: str = "best"
    max_delta: Optional[float] = None  # gate: refuse when the winner's test metric trails full FT by more points
    within_points: Optional[float] = None  # cheapest_within: allowed distance below full FT; None: report.margin
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
class ReportConfig:
    # How close to full FT counts as close enough, in points (x100) for accuracy-like metrics and the metric's
    # own units for a loss: verdicts, promotion ties and seed racing read the paired intervals against it. A
    # narrower margin needs more rows (or seeds) before any arm can be called equivalent.
    margin: float = 1.0

    def __post_init__(self) -> None:
        if not self.margin > 0:
            raise ConfigError(f"report.margin must be > 0, got {self.margin}")


@dataclass
class SweepConfig:
    trial: TrialConfig
    search: SearchConfig
    searcher: SearcherConfig
    scheduler: SchedulerConfig
    cluster: ClusterConfig
    promote: PromoteConfig
    report: ReportConfig = field(default_factory=ReportConfig)
    name: str = "sweep"
    # Dotted trial keys the user set on the command line (`method.r=16`): the plan refuses one that the
    # search space also sets, since the space would silently win.
    direct_keys: tuple = ()

    @property
    def metric(self) -> str:
        return self.search.metric or f"val_{self.trial.task.metric}"

    @property
    def mode(self) -> str:
        from trainers.record import metric_mode

        return self.search.mode or metric_mode(self.metric)


_SECTIONS = {"search": SearchConfig, "searcher": SearcherConfig, "scheduler": SchedulerConfig,
             "cluster": ClusterConfig, "promote": PromoteConfig, "report": ReportConfig}


def racing_problem(cfg: SweepConfig) -> Optional[str]:
    """Racing adds seeds to fixed arms, so every trial must be one of the plan's arms at one seed: a searcher
    that proposes its own configurations, a domain each trial draws anew, or repeated samples have no arm a
    second seed could be added to. One line naming the first such setting, or None. Asked by the plan, once
    the space itself is known to be well formed (sweeps/space.py `check`)."""
    from sweeps.space import SAMPLED, flatten

    search = cfg.search
    if not search.racing:
        return None
    head = "search.racing=true adds seeds to the plan's fixed arms"
    if cfg.searcher.name == "optuna":
        return f"{head}, but searcher=optuna proposes its own configurations: set search.racing=false or searcher=grid"
    sampled = [d.key for d in flatten(search.space) if d.kind in SAMPLED]
    if sampled:
        return (f"{head}, but search.space.{sampled[0]} is sampled (each trial draws its own value): make it a grid "
                "([...]) or set search.racing=false")
    if search.num_samples != 1:
        return f"{head}, each once: search.num_samples={search.num_samples} would repeat them; set it to 1"
    if cfg.trial.task.metric in ("loss", "perplexity"):
        # an arm is open while its paired interval over rows is; a loss is one number per split, no interval
        return (f"{head} while their paired intervals are open, and task.metric={cfg.trial.task.metric} has no "
                "per-row score to build one from: set search.racing=false or rank by a per-row metric")
    return None


def sweep_config_from_dict(data: dict) -> SweepConfig:
    data = dict(data)
    trial = trial_config_from_dict({k: data.pop(k) for k in TRIAL_SECTIONS if k in data})
    sections = {k: build_section(cls, data.pop(k, None), k) for k, cls in _SECTIONS.items()}
    name = data.pop("name", "sweep")
    for key in ("hydra", *RETIRED_KEYS):  # a sweep config saved by an older version may carry these
        data.pop(key, None)
    if data:
        raise ConfigError(f"unknown top-level config key {sorted(data)[0]!r}")
    return SweepConfig(trial=trial, name=name, **sections)


def load(overrides: list[str] | None = None) -> SweepConfig:
    cfg = sweep_config_from_dict(compose(overrides))
    cfg.direct_keys = tuple(direct_trial_keys(overrides or []))
    cfg.name = sweep_name(cfg, _shipped_task(overrides or [], cfg))
    return cfg


# Extensions a data file's name sheds to name a sweep (`chats.jsonl` -> chats, `rt.csv.bz2` -> rt).
_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv", ".txt", ".gz", ".bz2", ".xz", ".zst",
                  ".zip")


def _source_identity(source) -> tuple:
    """What makes two data sources the same data (a dict or a DataSource)."""
    get = source.get if isinstance(source, dict) else lambda key: getattr(source, key)
    return get("format"), get("path"), get("name")


def _shipped_task(overrides: list[str], cfg: SweepConfig) -> tuple[str, tuple]:
    """(name, source identity) of the task as its config file ships it: the config composed without the
    command line's edits of task.name and task.source. Composed again only when there are such edits."""
    def edits_task_identity(item: str) -> bool:
        key = item.partition("=")[0].lstrip("+~")
        return key == "task.name" or key == "task.source" or key.startswith("task.source.")

    kept = [item for item in overrides if not edits_task_identity(item)]
    task = compose(kept)["task"] if len(kept) < len(overrides) else dataclasses.asdict(cfg.trial.task)
    return task.get("name"), _source_identity(task.get("source") or {})


def data_stem(source) -> str:
    """A data source as a name: its file's or folder's name without extensions, an hf dataset's id (and
    config name); only letters, digits and `._-`."""
    path = str(source.path).rstrip("/")
    if source.format == "hf":
        stem = path.split("/")[-1] + (f"-{source.name}" if source.name else "")
    else:
        stem = Path(path.split("://", 1)[-1]).name
        while True:
            base, ext = os.path.splitext(stem)
            if not (base and ext.lower() in _DATA_SUFFIXES):
                break
            stem = base
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-") or "data"


def sweep_name(cfg: SweepConfig, shipped: tuple[str, tuple]) -> str:
    """The sweep's name, defined here once: the prefix of its id, its parent run's `name` param, and the
    registered model `peftsweep promote` writes (evaluation/promote.py reads it from the parent run).

    A `name=` the user gives wins. Otherwise `<task>-<model>` (conf/config.yaml), except for a sweep over data
    other than the task's own (task.source set away from what the task's config ships): that sweep is named
    after its data, `<data stem>-<model>`, so a chat file run through task=bbc_headlines is never registered
    as, nor replaces, the BBC headlines champion. A task the user renamed (task.name=...) names itself."""
    task, model = cfg.trial.task, cfg.trial.model
    if cfg.name != f"{task.name}-{model.name}":  # given by the user (name=...)
        return cfg.name
    shipped_name, shipped_source = shipped
    if task.name == shipped_name and _source_identity(task.source) != shipped_source:
        return f"{data_stem(task.source)}-{model.name}"
    return cfg.name


def direct_trial_keys(overrides: list[str]) -> list[str]:
    """The dotted trial keys a list of Hydra overrides sets (`method.r=16`, `+train.x=1`); group
    selections (`model=minilm`) and deletions (`~key`) set none."""
    keys = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        key = key.lstrip("+")
        if sep and "." in key and not key.startswith("~") and key.split(".")[0] in TRIAL_SECTIONS:
            keys.append(key)
    return keys


def conf_dir() -> str:
    """The shipped Hydra config tree (repo `conf/`), or $PEFTSWEEP_CONF."""
    env = os.environ.get("PEFTSWEEP_CONF")
    return env or str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """Hydra compose → plain dict (interpolations resolved). Raises ConfigError with one line."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf errors are many types; all are config errors
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if "Could not find" in lines[0]:  # unknown group option: list the ones that exist
        opts = []
        if any(ln.startswith("Available options") for ln in lines):
            start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options")) + 1
            opts = [ln for ln in lines[start:] if not ln.startswith(("Config search path", "provider="))]
            opts = opts[: next((i for i, o in enumerate(opts) if ":" in o), len(opts))]
        return lines[0].replace("In 'config': ", "") + (f" (available: {', '.join(opts)})" if opts else "")
    m = re.match(r"Could not override '([^']+)'", lines[0])
    if m and len(lines) > 1 and lines[1].startswith("To append"):
        return f"unknown config key {m[1]!r} (check the spelling; to add a new key use +{lines[1].split('+', 1)[1]})"
    return lines[0]


def trial_dict(cfg: SweepConfig) -> dict:
    return dataclasses.asdict(cfg.trial)


def as_dict(cfg: SweepConfig) -> dict:
    out = {k: v for k, v in dataclasses.asdict(cfg.trial).items()}
    for k in _SECTIONS:
        out[k] = dataclasses.asdict(getattr(cfg, k))
    out["name"] = cfg.name
    return out


