"""Task data: read the source, keep the labelled rows, split deterministically, tokenize."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from trainers.assets import resolve
from trainers.config import ConfigError, TaskConfig


def read_source(task: TaskConfig) -> pd.DataFrame:
    path = resolve(task.source.path)
    if not os.path.exists(path):
        raise ConfigError(f"task {task.name}: data source {task.source.path!r} does not exist")
    if task.source.format == "csv":
        frame = pd.read_csv(path)  # compression inferred from the suffix (.bz2, .gz, ...)
    elif task.source.format == "text_dirs":
        rows = [{"text": f.read_text(errors="replace"), "label": d.name}
                for d in sorted(Path(path).iterdir()) if d.is_dir()
                for f in sorted(d.glob("*.txt"))]
        frame = pd.DataFrame(rows, columns=["text", "label"])
    else:
        raise ConfigError(f"task {task.name}: source.format {task.source.format!r} is not csv or text_dirs")
    return frame


def check_columns(task: TaskConfig, columns) -> None:
    for role, column in (("text_column", task.text_column), ("label_column", task.label_column)):
        if column not in columns:
            raise ConfigError(f"task {task.name}: {role} {column!r} is not a column of "
                              f"{task.source.path} (it has: {', '.join(map(str, columns))})")


def load_splits(task: TaskConfig) -> dict[str, pd.DataFrame]:
    """train/validation/test frames with columns text, label (class index). The partition depends on
    `split_seed` only, so every arm and every training seed sees the same test set."""
    frame = read_source(task)
    check_columns(task, frame.columns)
    frame = frame[[task.text_column, task.label_column]].rename(
        columns={task.text_column: "text", task.label_column: "label_name"})
    present = set(frame["label_name"].astype(str))
    missing = [lab for lab in task.labels if lab not in present]
    if missing:
        raise ConfigError(f"task {task.name}: label(s) {missing} never occur in column "
                          f"{task.label_column!r} (values: {', '.join(sorted(present)[:10])})")
    frame = frame[frame["label_name"].astype(str).isin(task.labels)].dropna(subset=["text"])
    frame = frame.assign(text=frame["text"].astype(str),
                         label=frame["label_name"].astype(str).map({l: i for i, l in enumerate(task.labels)}))
    order = np.random.RandomState(task.split_seed).permutation(len(frame))
    frame = frame.iloc[order].reset_index(drop=True)[["text", "label"]]
    held_out = task.test_size + task.validation_size
    if held_out >= len(frame):
        raise ConfigError(f"task {task.name}: test_size + validation_size = {held_out} leaves no training "
                          f"rows out of {len(frame)}")
    train = frame.iloc[held_out:]
    if task.train_size is not None:
        train = train.iloc[: task.train_size]
    return {"test": frame.iloc[: task.test_size], "validation": frame.iloc[task.test_size: held_out],
            "train": train.reset_index(drop=True)}


def tokenize_classification(frame: pd.DataFrame, tokenizer, max_length: int):
    from datasets import Dataset

    ds = Dataset.from_pandas(frame, preserve_index=False)
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
                  batched=True, remove_columns=["text"]).rename_column("label", "labels")


def tokenize_sft(frame: pd.DataFrame, tokenizer, task: TaskConfig):
    """Prompt + label word; the loss is masked (-100) on the prompt so only the answer is learned.
    Also keeps the prompt alone for likelihood scoring of every label at evaluation."""
    from datasets import Dataset

    eos = tokenizer.eos_token or ""

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_len": []}
        for text, label in zip(batch["text"], batch["label"]):
            prompt_ids = tokenizer(task.prompt_template.format(text=text), truncation=True,
                                   max_length=task.max_length)["input_ids"]
            answer_ids = tokenizer(" " + task.labels[label] + eos, add_special_tokens=False)["input_ids"]
            ids = prompt_ids + answer_ids
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([-100] * len(prompt_ids) + answer_ids)
            out["prompt_len"].append(len(prompt_ids))
        return out

    ds = Dataset.from_pandas(frame, preserve_index=False)
    return ds.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "class_label")


def collate(tokenizer):
    """Dynamic padding: short reviews do not pay for max_length."""
    def fn(rows):
        lengths = [len(r["input_ids"]) for r in rows]
        width = max(lengths)
        pad = tokenizer.pad_token_id
        import torch

        batch = {
            "input_ids": torch.tensor([r["input_ids"] + [pad] * (width - n) for r, n in zip(rows, lengths)]),
            "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in lengths]),
        }
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = torch.tensor([r["token_type_ids"] + [0] * (width - n)
                                                    for r, n in zip(rows, lengths)])
        first = rows[0]["labels"]
        if isinstance(first, list):
            batch["labels"] = torch.tensor([r["labels"] + [-100] * (width - n) for r, n in zip(rows, lengths)])
        else:
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
        for extra in ("prompt_len", "class_label"):
            if extra in rows[0]:
                batch[extra] = torch.tensor([r[extra] for r in rows])
        return batch
    return fn
