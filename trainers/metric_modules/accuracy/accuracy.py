"""Accuracy as an `evaluate` module loaded from a local path (the hub copy needs network)."""
import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the reference label.",
            citation="",
            inputs_description="predictions, references: sequences of integer class indices",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape or predictions.size == 0:
            raise ValueError(f"need equal, non-empty inputs, got {predictions.shape} vs {references.shape}")
        return {"accuracy": float((predictions == references).mean())}
