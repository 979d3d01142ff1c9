"""Load a registered model the way a consumer does, in a fresh process, and score the held-out test split.

    python -m evaluation.reload_check models:/<name>/<version>     (MLFLOW_TRACKING_URI names the store)

Prints one JSON line: {"metric": ..., "value": ..., "n": ...}. Promotion runs it in a new interpreter so
that nothing the promoting process already holds (a loaded base, a patched module) can make a broken
version look fine.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def score(model_uri: str) -> dict:
    import mlflow
    import pandas as pd

    from trainers import data
    from trainers.metrics import classification_metrics

    model = mlflow.pyfunc.load_model(model_uri)
    cfg = model.unwrap_python_model().cfg
    test = data.load_splits(cfg.task)["test"]
    predicted = list(model.predict(pd.DataFrame({"text": test["text"]})))
    index = {label: i for i, label in enumerate(cfg.task.labels)}
    scores = classification_metrics([index[p] for p in predicted], list(test["label"]), len(cfg.task.labels))
    return {"metric": cfg.task.metric, "value": scores[cfg.task.metric], "n": len(test)}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(score(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
