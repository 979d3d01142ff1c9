"""MLflow models-from-code entry point of an adapter set (evaluation/adapter_set.py): the registered set carries
this file instead of a pickled object."""
from mlflow.models import set_model

from evaluation.adapter_set import AdapterSet

set_model(AdapterSet())
