"""The names a trial writes to MLflow: the one contract the report and promotion read."""

# Tags
STATUS = "peftsweep.status"  # one of STATUSES; MLflow's own run status says only FINISHED/FAILED/KILLED
STATUSES = ("running", "ok", "oom", "failed", "pruned")
ERROR = "peftsweep.error"
SWEEP_ID = "peftsweep.sweep_id"
ROLE = "peftsweep.role"  # "sweep" on the parent run, "trial" on children
# The configuration without the seed, as the sweep's plan labels it (sweeps/plan.py): unique per configuration
# within a sweep, so the report groups runs by it. A trial run alone is labelled trial-<its key>.
ARM = "peftsweep.arm"
DEVICE = "peftsweep.device"
GIT_COMMIT = "peftsweep.git_commit"
PRUNED_AT_STEP = "peftsweep.pruned_at_step"
RAY_NODE = "peftsweep.ray_node"  # the Ray node that ran the trial (set by the sweep)
RAY_TRIAL_ID = "peftsweep.ray_trial_id"
CUDA_VISIBLE_DEVICES = "peftsweep.cuda_visible_devices"
GPU_SHARE = "peftsweep.gpu_share"
# trials this trial's process ran before it (cluster.reuse_processes); 0: a fresh process (set by the sweep)
TRIALS_BEFORE_IN_PROCESS = "peftsweep.trials_before_in_process"
TRIAL_KEY = "peftsweep.trial_key"  # hash of the resolved trial config: finds a finished twin on --resume
RESUMED_FROM_STEP = "peftsweep.resumed_from_step"  # the checkpoint's step a restarted trial continued from
OOM_RETRY = "peftsweep.oom_retry"  # n-th retry after out-of-memory (half micro-batch, double accumulation)
VERSION_TAG_PREFIX = "peftsweep.version."  # + library name
PARENT_RUN_ID = "mlflow.parentRunId"

# Params (flat names, so the MLflow compare view can show them as columns)
PARAMS = (
    "model", "model_path", "task", "method", "r", "alpha", "dropout", "target_modules",
    "target_modules_resolved", "quantization", "double_quant", "compute_dtype", "lr", "batch_size",
    "grad_accum", "epochs", "max_steps", "seed", "train_size", "max_length", "sweep_id",
)

# Metrics
PEAK_VRAM_ALLOCATED_GB = "peak_vram_allocated_gb"
PEAK_VRAM_RESERVED_GB = "peak_vram_reserved_gb"
PEAK_HOST_RSS_GB = "peak_host_rss_gb"  # the whole process: interpreter and libraries (~1.2 GB on CPU) included
# What the method controls: the peak above the RSS right before the model loaded (weights, gradients,
# optimizer state, activations, evaluation), without the interpreter and libraries. Linux only.
PEAK_RSS_ABOVE_BASELINE_GB = "peak_rss_above_baseline_gb"
# What the method holds at its peak: the model's tensors by their bytes plus the most the C heap held above
# them, sampled after every forward, backward, optimizer step and evaluation batch; unlike RSS, without the
# freed pages glibc keeps mapped (glibc, Linux).
PEAK_TENSOR_MEMORY_GB = "peak_tensor_memory_gb"
WALL_TIME_S = "wall_time_s"
TRAIN_TIME_S = "train_time_s"
EVAL_TIME_S = "eval_time_s"
SETUP_TIME_S = "setup_time_s"  # trial start to the first training step: data, tokenizer, model load, wrapping
ENCODED_FROM_CACHE = "encoded_from_cache"  # 1: the tokenized splits were read from this machine's cache, 0: encoded
TOKENS_PER_S = "tokens_per_s"
TRAINABLE_PARAMS = "trainable_params"
TOTAL_PARAMS = "total_params"
TRAINABLE_PCT = "trainable_pct"
ADAPTER_MB = "adapter_mb"
FLOPS_PER_TOKEN = "flops_per_token"  # training FLOPs, LoRA-aware (trainers/flops.py)
TRAIN_TFLOPS_PER_S = "train_tflops_per_s"  # achieved model FLOP/s during training
MFU = "mfu"  # fraction of the device's dense peak (CUDA only)
PEAK_VRAM_NVML_GB = "vram_nvml_gb"  # the process's GPU memory as the driver sees it (allocator + CUDA context)
TRAIN_LOSS = "train_loss"
STEP = "step"
WORKERS = "workers"  # processes one trial ran on (param); memory figures are the max over them
STRATEGY = "strategy"  # single | ddp | fsdp (param)
PARAMETER_BYTES_PER_WORKER_GB = "parameter_gb_per_worker"  # what one worker holds of the weights (FSDP: ~1/world)

SFT_ROWS_DROPPED = "sft_rows_dropped"  # training rows whose answer alone exceeds task.max_length
GENERATIONS_TABLE = "generations/val.json"  # (id, prompt, reference, generation) per validation row, log_table

# Task metrics are logged as `<split>_<metric>`: val_accuracy during/after training, test_accuracy at the end.
def metric_key(split: str, metric: str) -> str:
    return f"{split}_{metric}"


# The task metrics each task type produces (bare names; logged as val_<name> and test_<name>): what a task's
# `metric` may name and what a sweep may rank by. Classification scores its head's argmax; a causal LM adds the
# answers' perplexity to the label-likelihood scores; sft scores the answers' loss and its greedy generations.
GENERATION_METRICS = ("rougeL", "chrf", "bleu", "exact_match")
TASK_METRICS = {"classification": ("accuracy", "macro_f1", "loss"),
                "causal_lm_sft": ("accuracy", "macro_f1", "loss", "perplexity"),
                "sft": GENERATION_METRICS + ("loss", "perplexity")}


def ranked_metrics(task_type: str) -> tuple[str, ...]:
    """Every result a trial of `task_type` reports that a sweep may rank by: its task metrics on validation
    and on test, and the training loss."""
    return (*(metric_key(split, m) for split in ("val", "test") for m in TASK_METRICS[task_type]), TRAIN_LOSS)


# Metrics where lower is better; every other task metric (accuracy, macro_f1, rougeL, chrf, bleu,
# exact_match: all fractions in [0, 1]) is better higher.
LOWER_IS_BETTER = ("loss", "perplexity")


def metric_mode(metric: str) -> str:
    """`min` or `max` for a bare or split-prefixed metric name: what search, report and promotion rank by."""
    return "min" if metric.split("_")[-1] in LOWER_IS_BETTER else "max"


def metric_scale(metric: str) -> float:
    """Fractions are shown (and compared) in points, 100 x; a loss as it is."""
    return 1.0 if metric_mode(metric) == "min" else 100.0


# Artifacts
ADAPTER_DIR = "adapter"  # safetensors + adapter_config.json (full FT: the whole model) + trial config
TRIAL_CONFIG_FILE = "peftsweep_trial.yaml"

# Per-row scores of the final validation and test passes: every arm is scored on the same rows (one split seed),
# so two arms' difference can be judged row by row (paired), which resolves far smaller differences than two
# means with their own errors. One file a split, row_scores/<split>.json with split = "val" | "test", as
# {"columns": [...], "data": [[...], ...]} (pandas' "split" orient, MLflow's table layout), in split order.
ROW_SCORES_DIR = "row_scores"
ROW_ID = "row_id"  # stable across arms, seeds and runs: a hash of what the row says (trainers/data.py row_ids)
# The row's value of the task metric: 1.0 / 0.0 (correct or not) for accuracy; sft: the row's ROUGE-L or
# exact match (their means are the logged metric), or its sentence chrF / BLEU (corpus chrF and BLEU are not
# means over rows: compare those from the `generation` column, evaluation/paired.py paired_corpus_diff); NaN
# for the teacher-forced loss and perplexity, which are scored on the encoded rows, not per row.
ROW_SCORE = "score"
# the other columns: classification (and causal_lm_sft): `prediction` and `label` (label names) and `loss` (the
# row's cross-entropy; for a causal LM, per answer token of its true label); sft: `rougeL`, `chrf`, `bleu`,
# `exact_match` (each in [0, 1]), `generation` and `reference`
ROW_SPLITS = ("val", "test")


def row_scores_file(split: str) -> str:
    """The artifact path of a split's per-row scores (`val` or `test`, as metrics name them)."""
    return f"{ROW_SCORES_DIR}/{split}.json"


def row_ids_hash_param(split: str) -> str:
    """The param holding the hash of a split's ordered row ids: runs whose hashes agree were scored on the
    same rows in the same order, so only they are paired."""
    return f"row_ids_hash_{split}"


def row_ids_hash(ids) -> str:
    """The hash of an ordered list of row ids, as `row_ids_hash_param` records it."""
    import hashlib

    return hashlib.sha1("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def standalone_arm(key: str) -> str:
    """The arm label of a trial run on its own (no sweep plan to name it): its trial key's prefix."""
    return f"trial-{key[:8]}"


# How a trial runs, not what it answers: one worker or four, DDP or FSDP, checkpointed or not compute the same
# steps (trainers/distributed.py), so a run on either is the same trial (and --resume finds it either way)
EXECUTION_KEYS = {"train": ("workers", "strategy", "checkpoint_every_steps", "keep_checkpoints")}


def trial_key(trial: dict) -> str:
    """Identity of a trial's configuration (tracking, placement and checkpointing excluded)."""
    import hashlib
    import json

    core = {k: v for k, v in trial.items() if k != "tracking"}
    for section, keys in EXECUTION_KEYS.items():
        if isinstance(core.get(section), dict):
            core[section] = {k: v for k, v in core[section].items() if k not in keys}
    return hashlib.sha1(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]
