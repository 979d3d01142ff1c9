"""Task metrics through `evaluate`, from the modules shipped beside this file in trainers/metric_modules/
(`evaluate.load` of a local folder: the hub's copies cannot be fetched offline). They live in the bottom
layer because a trial scores with them; evaluation and serving score through trainers' public API."""
from __future__ import annotations

import functools
import os


def metrics_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "metric_modules")


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    import evaluate

    path = os.path.join(metrics_dir(), name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no metric module {name!r} in {metrics_dir()}")
    return evaluate.load(path)


GENERATION_MODULES = ("rouge", "chrf", "bleu", "exact_match")  # folders in trainers/metric_modules/


def preload(generation: bool = False) -> None:
    """Load the metric modules now (evaluate and its modules hold ~45 MB of RSS once loaded)."""
    load_metric("accuracy")
    load_metric("f1")
    if generation:  # one tiny computation also imports what the modules import on first use (nltk, sacrebleu)
        generation_metrics(["a b"], ["a b"])


def classification_metrics(predictions, references, num_labels: int) -> dict[str, float]:
    out = load_metric("accuracy").compute(predictions=predictions, references=references)
    out["macro_f1"] = load_metric("f1").compute(predictions=predictions, references=references,
                                                average="macro", labels=list(range(num_labels)))["f1"]
    return out


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """rougeL, chrf, bleu and exact_match of generated texts against their references, each in [0, 1]."""
    out: dict[str, float] = {}
    for name in GENERATION_MODULES:
        out.update(load_metric(name).compute(predictions=list(predictions), references=list(references)))
    return out
