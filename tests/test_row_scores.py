"""Per-row scores: every trial records one score a row of validation and test, keyed by ids that are the same
in every arm and seed, so the report can compare arms row by row (evaluation/paired.py)."""
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from trainers import record, tracking
from trainers.config import TaskConfig, TrialConfig, trial_config_from_dict, trial_config_to_dict
from trainers.trial import run_trial


def _cfg(tiny_bert, store, seed, **method):
    data = trial_config_to_dict(TrialConfig())
    data["model"].update(path=tiny_bert, name="tiny-bert")
    data["task"].update(train_size=48, validation_size=32, test_size=48)
    data["train"].update(batch_size=8, max_steps=4, seed=seed)
    data["tracking"].update(uri=store["uri"], artifact_location=store["artifacts"])
    data["method"].update(method)
    return trial_config_from_dict(data)


def test_row_scores_are_the_logged_metrics_row_by_row_with_the_same_ids_in_every_arm(tiny_bert, store):
    client = MlflowClient(store["uri"])
    outs = [run_trial(_cfg(tiny_bert, store, 0, name="lora", r=4)),
            run_trial(_cfg(tiny_bert, store, 1, name="full"))]  # another seed and another method
    ids = {}
    for out in outs:
        assert out["status"] == "ok"
        run = client.get_run(out["mlflow_run_id"])
        for split, size in (("val", 32), ("test", 48)):
            rows = tracking.load_row_scores(client, run.info.run_id, split)
            assert list(rows.columns) == [record.ROW_ID, record.ROW_SCORE, "prediction", "label", "loss"]
            assert len(rows) == size and rows[record.ROW_ID].is_unique
            # exactly the logged metric: the same predictions, and the JSON reads back the same doubles
            assert rows[record.ROW_SCORE].mean() == run.data.metrics[f"{split}_accuracy"]
            assert set(rows[record.ROW_SCORE]) <= {0.0, 1.0}
            assert ((rows["prediction"] == rows["label"]) == (rows[record.ROW_SCORE] == 1.0)).all()
            assert rows["loss"].mean() == pytest.approx(run.data.metrics[f"{split}_loss"], rel=1e-5)
            assert run.data.params[record.row_ids_hash_param(split)] == record.row_ids_hash(rows[record.ROW_ID])
            ids.setdefault(split, []).append(list(rows[record.ROW_ID]))
    for split in ("val", "test"):
        assert ids[split][0] == ids[split][1]  # same rows, same order, whatever the seed or method
    assert set(ids["val"][0]).isdisjoint(ids["test"][0])
    # a run that logged none says so
    with pytest.raises(LookupError):
        tracking.load_row_scores(client, client.create_run("0").info.run_id, "test")


def test_row_ids_follow_the_rows_content_and_number_a_repeated_row():
    from trainers import data

    task = TaskConfig(labels=["fresh", "rotten"])
    frame = pd.DataFrame({"text": ["good", "bad", "good", "good"], "label": [0, 1, 0, 1]})
    ids = data.row_ids(frame, task)
    assert len(set(ids)) == 4
    assert ids[2] == f"{ids[0]}-2"  # the same text and label again
    assert ids[3] != ids[0]  # the same text with another label is another row
    assert data.row_ids(frame.iloc[[1, 0]].reset_index(drop=True), task) == [ids[1], ids[0]]  # not positional


def test_sft_row_scores_average_to_the_logged_generation_metrics():
    """Without training: the per-row scores of a generations table against the metric modules' corpus values."""
    from trainers import scoring
    from trainers.metrics import generation_metrics

    cfg = trial_config_from_dict({**trial_config_to_dict(TrialConfig()),
                                  "task": {"name": "t", "type": "sft", "metric": "rougeL",
                                           "format": "prompt_completion"}})
    references = ["the cat sat on the mat", "a quick brown fox", "hello world", "yes", "no way"]
    generated = ["the cat sat on a mat", "a slow brown dog", "hello   world", "no", "no way at all"]
    table = pd.DataFrame({"id": range(5), "prompt": ["p"] * 5, "reference": references, "generation": generated})
    rows = scoring.generation_rows(cfg, table)
    corpus = generation_metrics(generated, references)
    assert rows["rougeL"].mean() == pytest.approx(corpus["rougeL"], abs=1e-12)
    assert rows["exact_match"].mean() == pytest.approx(corpus["exact_match"], abs=1e-12) == 0.2
    assert (rows[record.ROW_SCORE] == rows["rougeL"]).all()
    for metric in ("chrf", "bleu"):  # sentence scores, in [0, 1] up to a rounding
        assert rows[metric].between(0, 1 + 1e-12).all()
        assert rows.loc[2, metric] == pytest.approx(1.0) and rows.loc[3, metric] == 0.0  # identical, disjoint
