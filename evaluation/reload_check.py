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

    from trainers import score_labels, split_texts

    model = mlflow.pyfunc.load_model(model_uri)
    cfg = model.unwrap_python_model().cfg
    texts = split_texts(cfg, "test")
    # predicted as a consumer would (raw text into the pyfunc), scored by the trial's own metric code
    scores = score_labels(cfg, list(model.predict(pd.DataFrame({"text": texts}))), "test")
    return {"metric": cfg.task.metric, "value": scores[cfg.task.metric], "n": len(texts)}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(score(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
