"""The MLflow pyfunc wrapper, logged as "model from code" so nothing heavy is pickled into the
registry (a pickled PythonModel would carry the loaded weights with it). Any MLflow client can
``mlflow.pyfunc.load_model("models:/<name>@champion").predict(pd.DataFrame({"text": [...]}))``;
labelloop's own serving unwraps it to reach the batched ``TextClassifier`` directly.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from training.classifier import TextClassifier


class LabelloopModel(PythonModel):
    classifier: TextClassifier

    def load_context(self, context: PythonModelContext) -> None:
        self.classifier = TextClassifier.load(context.artifacts["classifier"])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
                ) -> pd.DataFrame:
        texts = model_input["text"].astype(str).tolist()
        proba = self.classifier.predict_proba(texts)
        out = pd.DataFrame(proba, columns=[f"p_{label}" for label in self.classifier.labels])
        out.insert(0, "label", [self.classifier.labels[i] for i in proba.argmax(1)])
        return out


mlflow.models.set_model(LabelloopModel())
