"""ROUGE-L F-measure (longest common subsequence) through Google's rouge-score package, as a local
`evaluate` module (the hub copy needs network). Mean over rows, in [0, 1]."""
import datasets
import evaluate


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-L F1 between each generation and its reference, averaged over rows.",
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions, references: sequences of strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        from rouge_score import rouge_scorer

        if len(predictions) != len(references) or not predictions:
            raise ValueError(f"need equal, non-empty inputs, got {len(predictions)} vs {len(references)}")
        # no stemming: Porter stemming is English-only and users' data is often not English
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return {"rougeL": float(sum(scores) / len(scores))}
