"""Exact match as a local `evaluate` module: the fraction of generations equal to their reference once
surrounding and repeated whitespace is ignored (case counts: a format answer must match exactly)."""
import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of generations equal to the reference, whitespace-normalised.",
            citation="",
            inputs_description="predictions, references: sequences of strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references) or not predictions:
            raise ValueError(f"need equal, non-empty inputs, got {len(predictions)} vs {len(references)}")
        same = [" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references)]
        return {"exact_match": sum(same) / len(same)}
