"""The shipped metric modules, loaded through `evaluate` from their local paths."""
import pytest

from trainers.metrics import classification_metrics, load_metric


def test_accuracy_counts_matches():
    assert load_metric("accuracy").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}


def test_macro_f1_weighs_classes_equally():
    # class 0: tp=2 fp=1 fn=0 → F1 0.8; class 1: tp=1 fp=0 fn=1 → F1 2/3
    out = load_metric("f1").compute(predictions=[0, 0, 0, 1], references=[0, 0, 1, 1], average="macro")
    assert out["f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_a_class_never_predicted_scores_zero_f1():
    out = classification_metrics([0, 0, 0, 0], [0, 0, 1, 1], num_labels=2)
    assert out["accuracy"] == 0.5 and out["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError):
        load_metric("accuracy").compute(predictions=[0, 1], references=[0])
