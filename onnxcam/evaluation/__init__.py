"""Evaluating explanations on data sets: metrics tables, deployment checks, model comparisons.

- :func:`load_dataset`: a folder of images with optional ground truth (JSON/CSV manifests, Pascal
  VOC XML, mask PNGs).
- :func:`evaluate`: run CAM methods over a data set and compute the metrics of docs/method.md
  (:func:`drop_unreadable` first leaves out the samples whose image cannot be read).
- :func:`run_checks` / :func:`load_check_config`: a deployment gate from a TOML file.
- :func:`compare_models`: the same explanation from two models, per-image rank correlation and
  top-20% IoU (a regression check).
- :class:`Predictor`: batched class probabilities through an Explainer's own session.
"""

from onnxcam.evaluation.datasets import Dataset, Sample, load_dataset
from onnxcam.evaluation.evaluate import (DEFAULT_METHODS, Evaluation, MethodSpec, drop_unreadable, evaluate,
                                         parse_method, parse_methods)
from onnxcam.evaluation.predictor import Predictor, predict_proba, probabilities_from_logits

__all__ = [
    "DEFAULT_METHODS", "Dataset", "Evaluation", "MethodSpec", "Predictor", "Sample", "drop_unreadable", "evaluate",
    "load_dataset", "parse_method", "parse_methods", "predict_proba", "probabilities_from_logits",
]
