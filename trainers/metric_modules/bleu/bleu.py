"""BLEU through sacrebleu (its standard 13a tokenization, exponential smoothing), as a local `evaluate`
module; corpus-level, scaled to [0, 1] (sacrebleu reports 0-100)."""
import datasets
import evaluate


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU-4 as sacrebleu computes it, divided by 100.",
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description="predictions, references: sequences of strings (one reference per row)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        import sacrebleu

        if len(predictions) != len(references) or not predictions:
            raise ValueError(f"need equal, non-empty inputs, got {len(predictions)} vs {len(references)}")
        return {"bleu": sacrebleu.BLEU().corpus_score(list(predictions), [list(references)]).score / 100}
