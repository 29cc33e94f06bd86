"""The MLflow pyfunc wrapper, logged as "model from code" so nothing heavy is pickled into the
registry (a pickled PythonModel would carry the loaded weights with it). Any MLflow client can
``mlflow.pyfunc.load_model("models:/<name>@champion").predict(pd.DataFrame({"text": [...]}))``;
labelloop's own serving unwraps it to reach the batched ``TextClassifier`` directly.

The output has one ``p_<label>`` column per label. A single-label model adds ``label``, the chosen
label; a multi-label model adds ``labels``, the list of labels whose probability reaches the model's
tuned threshold (possibly empty), since its probabilities are independent and 0.5 is not its cut.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from training.classifier import TextClassifier


def output_frame(classifier: TextClassifier, proba: np.ndarray) -> pd.DataFrame:
    """What the pyfunc returns for ``proba`` (also the registry's signature example)."""
    out = pd.DataFrame(np.asarray(proba), columns=[f"p_{label}" for label in classifier.labels])
    decided = classifier.decide(proba)
    if classifier.multi_label:
        out.insert(0, "labels", [list(labels) for labels in decided])
    else:
        out.insert(0, "label", decided)
    return out


class LabelloopModel(PythonModel):
    classifier: TextClassifier

    def load_context(self, context: PythonModelContext) -> None:
        self.classifier = TextClassifier.load(context.artifacts["classifier"])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
                ) -> pd.DataFrame:
        texts = model_input["text"].astype(str).tolist()
        return output_frame(self.classifier, self.classifier.predict_proba(texts))


mlflow.models.set_model(LabelloopModel())
