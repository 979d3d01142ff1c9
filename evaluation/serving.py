"""The promoted adapter as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/<name>@champion")` and
`mlflow models serve --env-manager local` answer with label names for a `text` column, or, for an
instruction-tuned (sft) model, with the generated answer for a `prompt` column (the user's text) or a
`messages` column (the conversation so far, a list of {role, content}).

The model's only artifact is the adapter folder (weights, adapter_config.json, the trial config); the base
model is loaded from the reference in that config, as during training."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc


class TrainedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trainers import load_trained

        self.model, self.tokenizer, self.cfg = load_trained(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        from trainers import predict_texts

        return predict_texts(self.model, self.tokenizer, self.cfg, request_inputs(model_input, self.cfg))


def request_inputs(model_input, cfg) -> list:
    """The rows of a request as the model reads them: the `messages`, `prompt` or `text` column (a list of
    strings is taken as texts)."""
    from trainers import input_column

    if hasattr(model_input, "columns"):
        column = next((c for c in ("messages", "prompt", "text") if c in model_input.columns), None)
        if column is None:
            raise ValueError(f"expected a {input_column(cfg)!r} column, got {list(model_input.columns)}")
        return [_conversation(v) if column == "messages" else str(v) for v in model_input[column]]
    return [str(t) for t in model_input]


AdapterClassifier = TrainedModel  # the name versions registered before sft models load by


def _conversation(value) -> list[dict]:
    """A messages cell as JSON serving delivers it (a list, or a numpy array of dicts)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def save_pyfunc(weights_dir: str, dest: str, generative: bool = False) -> str:
    """Write an MLflow model folder wrapping `weights_dir`; requirements pinned to what trained it.
    `generative`: an sft model (prompt in, text out)."""
    import pandas as pd
    from mlflow.models import infer_signature

    import warnings

    example = pd.DataFrame({"prompt": ["Write the headline of this article: ..."]} if generative
                           else {"text": ["a warm, funny film"]})
    pins = [f"{lib}=={version(lib)}" for lib in ("torch", "transformers", "peft", "mlflow")]
    entry = Path(__file__).with_name("pyfunc_entry.py")  # models-from-code: no pickle in the registry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # advice about type hints and input examples
        mlflow.pyfunc.save_model(dest, python_model=str(entry), artifacts={"weights": weights_dir},
                                 signature=None if generative else infer_signature(example, ["label"]),
                                 pip_requirements=pins)
    return str(Path(dest))
