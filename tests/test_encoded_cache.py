"""Tokenized splits are encoded once per fingerprint and read back by later trials (trainers/encoded_cache.py):
the same rows, knobs and tokenizer read the cache; a change to any of them encodes afresh."""
from __future__ import annotations

import copy

import pytest

from sweeps.config import load
from trainers import data, encoded_cache, record, scoring
from trainers.model import load_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(encoded_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "encoded"


def _encode(overrides):
    cfg = load(overrides).trial
    tokenizer = load_tokenizer(cfg)
    splits = data.load_splits(cfg.task)
    calls = []

    def encode(frame):
        calls.append(len(frame))
        return scoring.encode_counted(frame, tokenizer, cfg)

    encoded, dropped, hit = encoded_cache.encoded_splits(splits, tokenizer, cfg, encode)
    return encoded, dropped, hit, calls, (splits, tokenizer, cfg)


def _rows(encoded):
    return {name: ds.to_dict() for name, ds in encoded.items()}


SFT = ["task=bbc_headlines", "task.train_size=24", "task.validation_size=8", "task.test_size=8", "task.max_length=64"]


def test_the_second_trial_reads_what_the_first_encoded_and_gets_the_same_rows(cache, tiny_llama):
    overrides = SFT + [f"model.path={tiny_llama}"]
    first, dropped, hit, calls, _ = _encode(overrides)
    assert not hit and sorted(calls) == [8, 8, 24]
    second, dropped_again, hit_again, calls_again, _ = _encode(overrides)
    assert hit_again and calls_again == [] and dropped_again == dropped
    assert _rows(second) == _rows(first)
    assert len(list(cache.iterdir())) == 1


@pytest.mark.parametrize("change", ["task.max_length=48", "task.split_seed=1", "task.instruction=Headline:"])
def test_a_changed_knob_or_row_encodes_afresh(cache, tiny_llama, change):
    base = SFT + [f"model.path={tiny_llama}"]
    _encode(base)
    _, _, hit, calls, _ = _encode(base + [change])
    assert not hit and calls
    assert len(list(cache.iterdir())) == 2


def test_a_changed_tokenizer_or_data_row_changes_the_fingerprint(cache, tiny_llama):
    _, _, _, _, (splits, tokenizer, cfg) = _encode(SFT + [f"model.path={tiny_llama}"])
    key = encoded_cache.fingerprint(splits, tokenizer, cfg)
    other = copy.deepcopy(tokenizer)
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert encoded_cache.fingerprint(splits, other, cfg) != key
    edited = {name: frame.copy() for name, frame in splits.items()}
    edited["train"].loc[edited["train"].index[0], "reference"] = "A different headline"
    assert encoded_cache.fingerprint(edited, tokenizer, cfg) != key
    assert encoded_cache.fingerprint(splits, tokenizer, cfg) == key


def test_an_entry_left_half_written_is_not_read_and_caching_can_be_off(cache, tiny_bert, monkeypatch):
    overrides = [f"model.path={tiny_bert}", "task.train_size=16", "task.validation_size=8", "task.test_size=8"]
    _encode(overrides)
    (entry,) = cache.iterdir()
    (entry / "dropped.json").unlink()  # what a trial killed mid-write would leave (were it not written aside)
    _, _, hit, calls, _ = _encode(overrides)
    assert not hit and calls
    monkeypatch.setenv(encoded_cache.CACHE_DIR_ENV, "off")
    _, _, hit, calls, _ = _encode(overrides)
    assert not hit and calls and encoded_cache.cache_dir() is None


def test_a_trial_records_whether_it_read_the_cache_and_scores_the_same(cache, tiny_bert, store):
    from tests.conftest import tiny_overrides
    from trainers.trial import run_trial

    cfg = load(tiny_overrides(tiny_bert, store) + ["train.max_steps=2"]).trial
    first, second = run_trial(cfg), run_trial(cfg)
    assert (first[record.ENCODED_FROM_CACHE], second[record.ENCODED_FROM_CACHE]) == (0.0, 1.0)
    assert first["val_accuracy"] == second["val_accuracy"] and first["train_loss"] == second["train_loss"]
