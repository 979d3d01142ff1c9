"""F1 as an `evaluate` module loaded from a local path; `average="macro"` weighs every class equally,
so a model that ignores the minority class cannot score well by accuracy alone."""
import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Per-class F1 (harmonic mean of precision and recall), averaged.",
            citation="",
            inputs_description="predictions, references: integer class indices; average: macro | micro",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", labels=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        classes = np.asarray(labels) if labels is not None else np.union1d(predictions, references)
        if average == "micro":
            return {"f1": float((predictions == references).mean())}
        if average != "macro":
            raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")
        scores = []
        for c in classes:
            tp = np.sum((predictions == c) & (references == c))
            fp = np.sum((predictions == c) & (references != c))
            fn = np.sum((predictions != c) & (references == c))
            denom = 2 * tp + fp + fn
            scores.append(0.0 if denom == 0 else 2 * tp / denom)
        return {"f1": float(np.mean(scores))}
