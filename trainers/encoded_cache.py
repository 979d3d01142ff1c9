"""Tokenized splits, computed once per fingerprint and reused by every trial on this machine.

Every trial of a sweep tokenizes the same rows with the same tokenizer; for instruction data (a chat template
rendered per row, character offsets for the answer mask) that is ~0.4 ms a row on 2 cores, so a 100k-row
set costs every trial ~40 s before its first step; reading the saved splits back is ~13x faster
(bench/encode_cache.py). The first trial to need a fingerprint saves its encoded splits (Arrow files, memory-mapped when
read back); the others load them. The fingerprint is everything the encoding reads: the rows of each split,
the task config, the tokenizer (its vocabulary and rules, special tokens, chat template, sides) and the
source of the modules that encode, so a changed row, knob, tokenizer or encoder never reads a stale entry.

Where: $PEFTSWEEP_CACHE_DIR/encoded (default ~/.cache/peftsweep/encoded), one folder per fingerprint, safe to
delete at any time; PEFTSWEEP_CACHE_DIR=off encodes every time. Trials on the same machine that miss at once
each encode, and the first to finish writing keeps its copy (written aside, then renamed into place).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from trainers.config import TrialConfig

CACHE_DIR_ENV = "PEFTSWEEP_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/peftsweep"
# the modules whose code decides what a row encodes to
ENCODER_SOURCES = ("data.py", "sft.py", "scoring.py", "encoded_cache.py")


def cache_dir() -> Path | None:
    """The folder holding encoded splits, or None when caching is off."""
    root = os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)
    if root.strip().lower() in ("", "off", "0", "false", "none"):
        return None
    return Path(root).expanduser() / "encoded"


def tokenizer_fingerprint(tokenizer) -> str:
    """A fast tokenizer's full serialization (vocabulary, normalizer, pre-tokenizer, post-processor) plus what
    the Python side adds: special tokens, chat template, padding and truncation sides, length limit."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary in id order
        h.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])).encode())
    h.update(json.dumps({"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
                         "chat_template": getattr(tokenizer, "chat_template", None),
                         "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
                         "model_max_length": tokenizer.model_max_length}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def fingerprint(splits: dict[str, pd.DataFrame], tokenizer, cfg: TrialConfig) -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ENCODER_SOURCES:
        h.update((here / name).read_bytes())
    h.update(json.dumps(dataclasses.asdict(cfg.task), sort_keys=True, default=str).encode())
    # the chat template a task names by file is read from that file: its content is the input, not its path
    template = cfg.task.chat_template
    if template and Path(template).expanduser().is_file():
        h.update(Path(template).expanduser().read_bytes())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for name in sorted(splits):
        h.update(name.encode())
        h.update(splits[name].to_json(orient="split", index=False, force_ascii=False).encode())
    return h.hexdigest()[:32]


def encoded_splits(splits: dict[str, pd.DataFrame], tokenizer, cfg: TrialConfig, encode) -> tuple[dict, dict, bool]:
    """({split: encoded Dataset}, {split: rows dropped}, read from the cache?). `encode(frame) -> (Dataset,
    dropped)` is how a split is encoded on a miss."""
    from datasets import load_from_disk

    root = cache_dir()
    if root is None:
        return (*_encode_all(splits, encode), False)
    entry = root / fingerprint(splits, tokenizer, cfg)
    if (entry / "dropped.json").exists():  # written last: its presence means the entry is whole
        dropped = json.loads((entry / "dropped.json").read_text())
        return {name: load_from_disk(str(entry / name)) for name in splits}, dropped, True
    encoded, dropped = _encode_all(splits, encode)
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
        for name, ds in encoded.items():
            ds.save_to_disk(str(staging / name))
        (staging / "dropped.json").write_text(json.dumps(dropped))
        staging.rename(entry)
    except OSError:  # another trial finished the same entry first (keep theirs), or no room to write: go on
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return encoded, dropped, False


def _encode_all(splits: dict[str, pd.DataFrame], encode) -> tuple[dict, dict]:
    encoded, dropped = {}, {}
    for name, frame in splits.items():
        encoded[name], dropped[name] = encode(frame)
    return encoded, dropped
