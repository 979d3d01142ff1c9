"""Load a registered model the way a consumer does, in a fresh process, and score the held-out test split.

    python -m evaluation.reload_check models:/<name>/<version> [METRIC]   (MLFLOW_TRACKING_URI names the store)

Prints one JSON line: {"metric": ..., "value": ..., "n": ...}. METRIC is the bare metric promotion compares
(accuracy, macro_f1, rougeL, loss, ...): the caller names it, so the reproduced figure is always the one the
logged figure is checked against; without it, the adapter's own task metric. Promotion runs it in a new interpreter so
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


def score(model_uri: str, metric: str | None = None) -> dict:
    import mlflow
    import pandas as pd

    from trainers import input_column, score_predictions, split_inputs

    model = mlflow.pyfunc.load_model(model_uri)
    loaded = model.unwrap_python_model()
    cfg = loaded.cfg
    metric = metric or cfg.task.metric
    if cfg.task.type == "sft" and metric in ("loss", "perplexity"):
        # a teacher-forced loss has no served counterpart: score the model the pyfunc loaded
        from trainers import score_split

        value = score_split(loaded.model, loaded.tokenizer, cfg, "test")[f"test_{metric}"]
        return {"metric": metric, "value": value, "n": None}
    inputs = split_inputs(cfg, "test")
    # predicted as a consumer would (raw inputs into the pyfunc), scored by the trial's own metric code
    scores = score_predictions(cfg, list(model.predict(pd.DataFrame({input_column(cfg): inputs}))), "test")
    if metric not in scores:
        raise ValueError(f"the reloaded model's predictions give {', '.join(sorted(scores))}, not {metric!r}")
    return {"metric": metric, "value": scores[metric], "n": len(inputs)}


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(score(*argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
