"""chrF (character n-gram F-score) through sacrebleu, as a local `evaluate` module; corpus-level, scaled
to [0, 1] like every other task metric (sacrebleu reports 0-100)."""
import datasets
import evaluate


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), divided by 100.",
            citation="Popovic, 2015. chrF: character n-gram F-score for automatic MT evaluation.",
            inputs_description="predictions, references: sequences of strings (one reference per row)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        import sacrebleu

        if len(predictions) != len(references) or not predictions:
            raise ValueError(f"need equal, non-empty inputs, got {len(predictions)} vs {len(references)}")
        return {"chrf": sacrebleu.CHRF().corpus_score(list(predictions), [list(references)]).score / 100}
