"""Class probabilities through an Explainer's own runtime session, in batches.

The evaluation metrics (Average Drop, Increase in Confidence, Deletion, Insertion) need a
``predict(x) -> probabilities`` callable. :class:`Predictor` is that callable for an
:class:`~onnxcam.explain.Explainer`: it runs the Explainer's rewritten model (the same
``GradientSession``, so no second copy of the model is loaded) with a **zero seed**, which makes
the gradient outputs zero and leaves the logits exactly those of the plain forward pass, and turns
the logits into probabilities the way the Explainer does for ``Explanation.probability`` (softmax;
sigmoid for a model whose output is a Sigmoid of its logits). Inputs are cut into chunks of
``batch_size`` rows: one ``InferenceSession.run`` per chunk, never one per image.

A segmentation model's class probability is, as for its explanations, the class's mean
probability over the pixels it is predicted at (``onnxcam.explain.regions``), and its predicted
class the one with the largest region (``Predictor.predict``), not the argmax of those means.
"""

from __future__ import annotations

import numpy as np

from onnxcam.errors import DataError, OptionError
from onnxcam.explain.regions import PixelClasses

__all__ = ["Predictor", "predict_proba", "probabilities_from_logits"]


def probabilities_from_logits(logits: np.ndarray, squash: str = "softmax") -> np.ndarray:
    """(N, classes) float64 probabilities: a numerically stable softmax (or a sigmoid)."""
    values = np.asarray(logits, dtype=np.float64)
    if squash == "sigmoid":
        return 1.0 / (1.0 + np.exp(-values))
    shifted = values - values.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _squash_of(explainer) -> str:
    # The Explainer decides softmax vs sigmoid from the graph when it is built; there is no public
    # accessor yet (see the report: a public ``predict_proba`` hook would remove this read).
    squash = getattr(explainer, "_squash", "softmax")
    return squash if squash in ("softmax", "sigmoid") else "softmax"


class Predictor:
    """``predictor(x) -> (N, classes)`` probabilities for preprocessed inputs ``x`` (N, C, H, W)
    (or the model's layout), through ``explainer.session`` with a zero seed.

    ``batch_size`` rows per run (default: the Explainer's batch size). ``runs`` counts the
    session runs made by this predictor and ``rows`` the inputs they carried.
    """

    def __init__(self, explainer, batch_size: int | None = None) -> None:
        if explainer.score is not None:
            raise OptionError("evaluation needs class scores: create the Explainer without score= "
                              "(neuron-level maps have no class probability)")
        if not explainer.num_classes:
            raise OptionError("the model's number of classes is not fixed: evaluation needs a static "
                              "class dimension")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise OptionError(f"batch size {batch_size!r} must be a whole number >= 1")
        self.explainer = explainer
        self.session = explainer.session
        self.seed_shape = tuple(explainer.gradient_model.seed_shape[1:])
        self.batch_size = int(batch_size) if batch_size is not None else int(explainer.batch_size)
        self.squash = _squash_of(explainer)
        gm = explainer.gradient_model
        self.regions = (PixelClasses.of(gm.num_classes, gm.class_grid, self.squash, explainer.labels, gm.class_axis)
                        if gm.class_grid is not None else None)
        self.runs = 0
        self.rows = 0

    @property
    def num_classes(self) -> int:
        return int(self.explainer.num_classes)

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """(N, classes) float32 logits of the plain forward pass, ``batch_size`` rows per run."""
        x = np.asarray(inputs)
        if x.ndim != 4 or len(x) == 0:
            raise DataError(f"predict: expected a non-empty batch of 4-D inputs, got shape {x.shape}")
        parts = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            seed = np.zeros((len(chunk), *self.seed_shape), dtype=np.float32)
            _, _, logits = self.session.run(chunk, seed)
            self.runs += 1
            self.rows += len(chunk)
            parts.append(np.asarray(logits))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self.predict(inputs)[0]

    def predict(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, classes) probabilities and (N,) predicted classes, the targets ``explain`` picks."""
        logits = self.logits(inputs)
        if self.regions is None:
            probabilities = probabilities_from_logits(logits, self.squash)
            return probabilities, probabilities.argmax(axis=1)
        return self.regions.predicted(logits)


def predict_proba(explainer, inputs: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Probabilities (N, classes) of preprocessed ``inputs`` through ``explainer``'s session."""
    return Predictor(explainer, batch_size)(inputs)
