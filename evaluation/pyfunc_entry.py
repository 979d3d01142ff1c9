"""MLflow models-from-code entry point: the registered champion carries this file instead of a pickled
object, so loading it never unpickles arbitrary code."""
from mlflow.models import set_model

from evaluation.serving import TrainedModel

set_model(TrainedModel())
