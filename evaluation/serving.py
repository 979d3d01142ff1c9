"""The promoted adapter as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/<name>@champion")` and
`mlflow models serve --env-manager local` answer with label names for a `text` column.

The model's only artifact is the adapter folder (weights, adapter_config.json, the trial config); the base
model is loaded from the reference in that config, as during training."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc


class AdapterClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trainers import load_trained

        self.model, self.tokenizer, self.cfg = load_trained(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        from trainers import predict_texts

        texts = list(model_input["text"]) if hasattr(model_input, "columns") else [str(t) for t in model_input]
        return predict_texts(self.model, self.tokenizer, self.cfg, texts)


def save_pyfunc(weights_dir: str, dest: str) -> str:
    """Write an MLflow model folder wrapping `weights_dir`; requirements pinned to what trained it."""
    import pandas as pd
    from mlflow.models import infer_signature

    import warnings

    example = pd.DataFrame({"text": ["a warm, funny film"]})
    pins = [f"{lib}=={version(lib)}" for lib in ("torch", "transformers", "peft", "mlflow")]
    entry = Path(__file__).with_name("pyfunc_entry.py")  # models-from-code: no pickle in the registry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # advice about type hints and input examples
        mlflow.pyfunc.save_model(dest, python_model=str(entry), artifacts={"weights": weights_dir},
                                 signature=infer_signature(example, ["label"]), pip_requirements=pins)
    return str(Path(dest))
