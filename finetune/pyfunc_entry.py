"""MLflow "models from code" entry of the video classifier pyfunc (logged by `finetune.mlflow_model.log_model`).

MLflow runs this file when it loads the model, instead of unpickling a Python object: nothing is unpickled.
Not imported by tubelet itself (importing it registers the model with MLflow).
"""

import mlflow

from finetune.mlflow_model import VideoClassifierModel

mlflow.models.set_model(VideoClassifierModel())
