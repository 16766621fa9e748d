"""Evaluation metrics for class activation maps (docs/method.md, "Evaluation metrics").

NumPy only. Faithfulness metrics take a ``predict`` callable (a batch of preprocessed inputs
``(B, C, H, W)`` -> class probabilities ``(B, classes)``) and call it on batches; localization
metrics compare maps with ground-truth boxes or masks and need no model.
"""

from onnxcam.metrics.faithfulness import (
    DeletionInsertionResult,
    ExplanationMapScores,
    average_drop,
    deletion_insertion,
    explanation_images,
    explanation_map_scores,
    gaussian_blur,
    increase_in_confidence,
)
from onnxcam.metrics.localization import (
    EnergyPointingResult,
    InstanceCoverageResult,
    PointingGameResult,
    energy_pointing_game,
    instance_coverage,
    pointing_game,
)
from onnxcam.metrics.regions import (
    LocalizationItem,
    LocalizationSet,
    box_mask,
    instance_masks,
    load_manifest,
    region_mask,
    scale_boxes,
)

__all__ = [
    "DeletionInsertionResult",
    "EnergyPointingResult",
    "ExplanationMapScores",
    "InstanceCoverageResult",
    "LocalizationItem",
    "LocalizationSet",
    "PointingGameResult",
    "average_drop",
    "box_mask",
    "deletion_insertion",
    "energy_pointing_game",
    "explanation_images",
    "explanation_map_scores",
    "gaussian_blur",
    "increase_in_confidence",
    "instance_coverage",
    "instance_masks",
    "load_manifest",
    "pointing_game",
    "region_mask",
    "scale_boxes",
]
