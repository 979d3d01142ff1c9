"""Task data: read the source (trainers/sources.py), keep the labelled rows, split deterministically, tokenize."""
from __future__ import annotations

import pandas as pd

from trainers import sources
from trainers.config import ConfigError, TaskConfig


def read_source(task: TaskConfig) -> pd.DataFrame:
    """Every row of the task's source as one frame (its own splits concatenated): for column checks."""
    frames = sources.read(task.source, task.name)
    return pd.concat(list(frames.values()), ignore_index=True) if len(frames) > 1 else next(iter(frames.values()))


def check_columns(task: TaskConfig, columns) -> None:
    for role, column in (("text_column", task.text_column), ("label_column", task.label_column)):
        if column not in columns:
            raise ConfigError(f"task {task.name}: {role} {column!r} is not a column of "
                              f"{task.source.path} (it has: {', '.join(map(str, columns))})")


def load_splits(task: TaskConfig) -> dict[str, pd.DataFrame]:
    """train/validation/test frames: for classification columns text, label (class index); for sft the
    conversation of each row (trainers/sft.py). The partition depends on `split_seed` only, so every arm and
    every training seed sees the same test set."""
    frames = sources.read(task.source, task.name)
    if task.type == "sft":
        from trainers import sft

        return {name: sft.normalize(frame, task) for name, frame in sources.partition(frames, task).items()}
    check_columns(task, sources.columns_of(frames))
    present = {str(v) for f in frames.values() for v in f[task.label_column].dropna()}
    missing = [lab for lab in task.labels if lab not in present]
    if missing:
        raise ConfigError(f"task {task.name}: label(s) {missing} never occur in column "
                          f"{task.label_column!r} (values: {', '.join(sorted(present)[:10])})")
    index = {label: i for i, label in enumerate(task.labels)}

    def labelled(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame[[task.text_column, task.label_column]].rename(
            columns={task.text_column: "text", task.label_column: "label_name"})
        frame = frame[frame["label_name"].astype(str).isin(task.labels)].dropna(subset=["text"])
        return frame.assign(text=frame["text"].astype(str),
                            label=frame["label_name"].astype(str).map(index))[["text", "label"]]

    return sources.partition({name: labelled(f) for name, f in frames.items()}, task)


def row_ids(frame: pd.DataFrame, task: TaskConfig) -> list[str]:
    """A stable id for each row of a split (classification: its text and label name; sft: its prompt and
    reference), in split order: a 12-hex-digit hash of what the row says, so the same row has the same id in
    every arm, seed and run, whatever the source's row order. The partition drops the source's row index, and
    a content hash also keeps pairing honest if the file is edited. A repeated row (the same review twice)
    gets its occurrence number appended (`<hash>-2`), counted in split order, so ids are unique."""
    import hashlib
    import json

    if task.type == "sft":
        keys = [json.dumps([prompt, reference], sort_keys=True, ensure_ascii=False)
                for prompt, reference in zip(frame["prompt"], frame["reference"])]
    else:
        keys = [json.dumps([text, task.labels[int(label)]], ensure_ascii=False)
                for text, label in zip(frame["text"], frame["label"])]
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        seen[digest] = seen.get(digest, 0) + 1
        out.append(digest if seen[digest] == 1 else f"{digest}-{seen[digest]}")
    return out


def tokenize_classification(frame: pd.DataFrame, tokenizer, max_length: int):
    from datasets import Dataset

    # one call of the fast tokenizer over the whole split: `Dataset.map` would first hash the function, and
    # the tokenizer it holds, for a fingerprint nobody reads (~0.5 s a trial on 2 cores; trials share
    # tokenized splits through trainers/encoded_cache.py instead)
    encoded = tokenizer(list(frame["text"]), truncation=True, max_length=max_length)
    return Dataset.from_dict({"labels": [int(label) for label in frame["label"]], **encoded})


def tokenize_sft(frame: pd.DataFrame, tokenizer, task: TaskConfig):
    """Prompt + label word; the loss is masked (-100) on the prompt so only the answer is learned.
    Also keeps the prompt alone for likelihood scoring of every label at evaluation."""
    from datasets import Dataset

    eos = tokenizer.eos_token or ""
    out = {"class_label": [], "input_ids": [], "attention_mask": [], "labels": [], "prompt_len": []}
    for text, label in zip(frame["text"], frame["label"]):
        prompt_ids = tokenizer(task.prompt_template.format(text=text), truncation=True,
                               max_length=task.max_length)["input_ids"]
        answer_ids = tokenizer(" " + task.labels[label] + eos, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids
        out["class_label"].append(int(label))
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append([-100] * len(prompt_ids) + answer_ids)
        out["prompt_len"].append(len(prompt_ids))
    return Dataset.from_dict(out)  # built directly: see tokenize_classification


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
