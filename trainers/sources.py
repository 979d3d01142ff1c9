"""Reading a task's rows from where the user keeps them: one file, a folder of per-split files, folders of
text files, or a `datasets` dataset (a hub id or a local folder). A source either brings its own splits
({"train", "validation", "test"}, any of them) or one table ({"all"}) that `partition` splits by seed.

CSV is read by pandas (compression inferred from the suffix, as it always was); JSON Lines, JSON, Parquet
and `hf` go through `datasets`, whose Arrow cache makes a second read of the same file cheap.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from trainers.assets import looks_local, resolve
from trainers.config import ConfigError, DataSource, TaskConfig

SPLITS = ("train", "validation", "test")
_EXTENSIONS = {"csv": "csv", "jsonl": "jsonl", "json": "json", "parquet": "parquet"}
_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet"}


def read(source: DataSource, task_name: str) -> dict[str, pd.DataFrame]:
    """{split: frame} of the source's own splits, or {"all": frame}."""
    if source.format == "hf":
        return _read_hf(source, task_name)
    path = resolve(source.path)
    if not os.path.exists(path):
        raise ConfigError(f"task {task_name}: data source {source.path!r} does not exist")
    if source.format == "text_dirs":
        return {"all": _read_text_dirs(Path(path))}
    if os.path.isdir(path):
        ext = _EXTENSIONS[source.format]
        files = {s: os.path.join(path, f"{s}.{ext}") for s in SPLITS if os.path.exists(os.path.join(path, f"{s}.{ext}"))}
        if "train" not in files:
            raise ConfigError(f"task {task_name}: folder {source.path!r} has no train.{ext} "
                              f"(a folder source holds train.{ext}, and optionally validation.{ext}, test.{ext})")
        return {s: _read_file(f, source.format, task_name) for s, f in files.items()}
    return {"all": _read_file(path, source.format, task_name)}


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs a malformed file at ERROR level before raising, and draws progress bars: the raised
    error becomes our one line, and a sweep's output stays its own."""
    import datasets

    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(level)


def _read_file(path: str, fmt: str, task_name: str) -> pd.DataFrame:
    try:
        if fmt == "csv":
            return pd.read_csv(path)
        from datasets import load_dataset

        with _quiet_datasets():
            ds = load_dataset(_BUILDERS[fmt], data_files=path, split="train")
        return pd.DataFrame(ds.to_list())  # to_list keeps nested cells (a messages list) as Python objects
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed file is the user's input error
        raise ConfigError(f"task {task_name}: cannot read {path} as {fmt}: {_first_line(exc)}") from None


def _read_text_dirs(root: Path) -> pd.DataFrame:
    """<root>/<label>/*.txt, one row per file; a news file's first line is its title, the rest its body."""
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(d.glob("*.txt")):
            text = f.read_text(errors="replace")
            title, _, body = text.strip().partition("\n")
            rows.append({"text": text, "label": d.name, "title": title.strip(), "body": body.strip()})
    return pd.DataFrame(rows, columns=["text", "label", "title", "body"])


def _read_hf(source: DataSource, task_name: str) -> dict[str, pd.DataFrame]:
    import datasets

    path = resolve(source.path)
    local = looks_local(source.path)
    if local and not os.path.exists(path):
        raise ConfigError(f"task {task_name}: data source {source.path!r} does not exist")
    try:
        with _quiet_datasets():
            if local and (Path(path, "dataset_dict.json").exists() or Path(path, "state.json").exists()):
                loaded = datasets.load_from_disk(path)  # a folder written by save_to_disk
                if source.split and isinstance(loaded, datasets.DatasetDict):
                    loaded = loaded[source.split]
            else:
                loaded = datasets.load_dataset(path, source.name, split=source.split, revision=source.revision)
    except Exception as exc:  # noqa: BLE001
        where = "local dataset" if local else "dataset on the Hugging Face Hub (offline, private or unknown id?)"
        raise ConfigError(f"task {task_name}: cannot load {where} {source.path!r}: {_first_line(exc)}") from None
    if isinstance(loaded, datasets.Dataset):
        return {"all": pd.DataFrame(loaded.to_list())}
    own = {("validation" if s in ("valid", "val", "dev") else s): d for s, d in loaded.items()}
    if "train" not in own:
        raise ConfigError(f"task {task_name}: dataset {source.path!r} has no train split (has: {', '.join(own)})")
    return {s: pd.DataFrame(own[s].to_list()) for s in SPLITS if s in own}


def columns_of(frames: dict[str, pd.DataFrame]) -> list[str]:
    return [str(c) for c in next(iter(frames.values())).columns]


def partition(frames: dict[str, pd.DataFrame], task: TaskConfig) -> dict[str, pd.DataFrame]:
    """train/validation/test. A source's own splits are kept (each capped at its task size); a missing
    validation (or test) split is carved from train, and one table is split, by `split_seed` alone, so every
    arm and every training seed sees the same held-out rows."""
    def shuffled(frame: pd.DataFrame) -> pd.DataFrame:
        order = np.random.RandomState(task.split_seed).permutation(len(frame))
        return frame.iloc[order].reset_index(drop=True)

    pool = shuffled(frames["all"] if "all" in frames else frames["train"])
    out = {}
    for split, size in (("test", task.test_size), ("validation", task.validation_size)):
        if split in frames:
            out[split] = frames[split].head(size).reset_index(drop=True)
        else:
            out[split], pool = pool.iloc[:size].reset_index(drop=True), pool.iloc[size:]
    if len(pool) == 0:
        raise ConfigError(f"task {task.name}: test_size + validation_size = {task.test_size + task.validation_size}"
                          f" leaves no training rows out of {sum(len(f) for f in frames.values())}")
    train = pool.reset_index(drop=True)
    out["train"] = train.head(task.train_size) if task.train_size is not None else train
    return {"test": out["test"], "validation": out["validation"], "train": out["train"]}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
