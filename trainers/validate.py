"""Checks a trial can run, without loading weights or data into a model: used by `python -m trainers`,
`peftsweep plan` and `peftsweep sweep` before anything starts."""
from __future__ import annotations

from trainers import data, quantization, sft, sources
from trainers.config import ConfigError, TrialConfig
from trainers.device import pick_device
from trainers.estimate import sequence_length
from trainers.model import cached_meta_model, position_limit
from trainers.modules import min_dim, resolve_target_modules

_SOURCES: dict = {}


def _source_facts(task) -> tuple[tuple[str, ...], dict]:
    """(columns, rows per label value) of a data source, read once per process however many trials share it."""
    key = (task.source.path, task.source.format, task.label_column)
    if key not in _SOURCES:
        frame = data.read_source(task)
        counts = (frame[task.label_column].astype(str).value_counts().to_dict()
                  if task.label_column in frame else {})
        _SOURCES[key] = (tuple(map(str, frame.columns)), counts)
    return _SOURCES[key]


def _sft_problems(cfg: TrialConfig) -> list[str]:
    """Every row must read as a conversation ending in a non-empty answer, and the tokenizer must render it:
    found now, not after a sweep's first trial has trained for minutes."""
    task = cfg.task
    key = ("sft", task.source.path, task.source.format, task.format, repr(sorted(task.columns.items())),
           task.instruction, task.split_seed, task.test_size, task.validation_size)
    if key not in _SOURCES:
        try:
            frames = sources.read(task.source, task.name)
            for frame in frames.values():
                sft.normalize(frame, task)
            sources.partition(frames, task)
            _SOURCES[key] = None
        except ConfigError as exc:
            _SOURCES[key] = str(exc)
    problems = [_SOURCES[key]] if _SOURCES[key] else []
    tkey = ("tokenizer", cfg.model.path, cfg.model.gguf_file, cfg.model.revision, task.format, task.chat_template)
    if tkey not in _SOURCES:
        from trainers.model import load_tokenizer

        try:
            _SOURCES[tkey] = sft.template_problem(load_tokenizer(cfg), task)
        except ConfigError as exc:
            _SOURCES[tkey] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a model without a loadable tokenizer
            _SOURCES[tkey] = f"cannot load the tokenizer of {cfg.model.path!r}: {str(exc).splitlines()[0][:200]}"
    return problems + ([_SOURCES[tkey]] if _SOURCES[tkey] else [])


def validate_trial(cfg: TrialConfig) -> list[str]:
    """Every problem found, each one line; empty when the trial can start."""
    problems: list[str] = []
    device = pick_device(cfg.train.device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append("train.device=cuda but no CUDA device is visible")
    err = quantization.support_error(cfg.quant, device)
    if err:
        problems.append(err)
    if cfg.task.type == "sft":
        problems += _sft_problems(cfg)
    else:
        problems += _classification_data_problems(cfg)
    try:
        model = cached_meta_model(cfg)
    except ConfigError as exc:
        return problems + [str(exc)]
    limit = position_limit(model.config)
    if limit and sequence_length(cfg) > limit:
        # past the position table the model fails mid-trial (absolute positions) or degrades silently (rotary)
        extra = {"classification": "", "causal_lm_sft": " (with the answer tokens a causal LM adds)",
                 "sft": f" (with task.max_new_tokens={cfg.task.max_new_tokens} generated after the prompt)"}
        problems.append(f"task.max_length={cfg.task.max_length} exceeds the {limit} positions of {cfg.model.name}"
                        + extra[cfg.task.type])
    if cfg.method.is_adapter:
        try:
            targets = resolve_target_modules(model, cfg.method.target_modules)
        except ConfigError as exc:
            return problems + [str(exc)]
        modules = dict(model.named_modules())
        if cfg.method.name != "ia3":
            smallest = min(min_dim(modules[n]) for n in targets)
            if cfg.method.r > smallest:
                problems.append(f"method.r={cfg.method.r} exceeds the smallest targeted layer dimension "
                                f"({smallest}) of {cfg.model.name}")
    return problems


def _classification_data_problems(cfg: TrialConfig) -> list[str]:
    problems = []
    try:
        task = cfg.task
        columns, labels = _source_facts(task)
        data.check_columns(task, columns)
        missing = [lab for lab in task.labels if lab not in labels]
        if missing:
            problems.append(f"task {task.name}: label(s) {missing} never occur in column {task.label_column!r}")
        rows = sum(labels.get(lab, 0) for lab in task.labels)
        if not missing and task.test_size + task.validation_size >= rows:
            problems.append(f"task {task.name}: test_size + validation_size = "
                            f"{task.test_size + task.validation_size} leaves no training rows out of {rows}")
    except ConfigError as exc:
        problems.append(str(exc))
    return problems
