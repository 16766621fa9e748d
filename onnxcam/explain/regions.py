"""Class targets of a segmentation model, whose scores are per pixel ([N, classes, H, W]).

A class's score is the sum of its logits over the pixels the model assigns to it (Vinogradova et
al. 2020, "Towards interpretable semantic segmentation via gradient-weighted class activation
mapping"), so the map says what made the model paint that region; a class that owns no pixel is
scored over the whole image. The seed row is that region's mask on the class's plane of the
flattened logits (``onnxcam_logits``). The region comes from the clean image and stays the same
for every noisy sample of Smooth Grad-CAM++: it is the score being explained.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Labels of the class that is "nothing": the predicted targets pass over it (the largest region
#: of most scenes), as long as another class owns a pixel. Given explicitly it is explained.
BACKGROUND_LABELS = {"background", "__background__", "_background_", "bg", "void", "unlabeled",
                     "unlabelled", "others", "other"}


@dataclass(frozen=True)
class PixelClasses:
    """How to read a segmentation model's flattened logits (G, classes * H * W)."""

    classes: int
    grid: tuple[int, int]
    squash: str = "softmax"  # "sigmoid": each class is its own yes/no (its region: logit > 0)
    background: tuple[int, ...] = ()
    channels_last: bool = False  # the logits are [N, H, W, classes]

    @classmethod
    def of(cls, classes: int, grid: Sequence[int], squash: str, labels: Sequence[str] | None,
           class_axis: int = 1) -> PixelClasses:
        background = tuple(i for i, label in enumerate(labels or ())
                           if label.strip().casefold() in BACKGROUND_LABELS)
        return cls(int(classes), (int(grid[0]), int(grid[1])), squash, background, class_axis == 3)

    def planes(self, logits: np.ndarray) -> np.ndarray:
        """(G, classes, H, W) view of the flattened logits."""
        logits = np.asarray(logits)
        if self.channels_last:
            return logits.reshape(len(logits), *self.grid, self.classes).transpose(0, 3, 1, 2)
        return logits.reshape(len(logits), self.classes, *self.grid)

    def owned(self, logits: np.ndarray) -> np.ndarray:
        """(G, classes, H, W) bool: the pixels each class is predicted at (argmax over the
        classes, the first of ties; with sigmoid scores, a logit above 0)."""
        planes = self.planes(logits)
        if self.squash == "sigmoid" or self.classes == 1:
            return planes > 0
        winner = np.argmax(planes, axis=1)
        return winner[:, None] == np.arange(self.classes)[None, :, None, None]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(G, classes, H, W) per-pixel probabilities (softmax over the classes, or sigmoid)."""
        planes = np.asarray(self.planes(logits), dtype=np.float64)
        if self.squash == "sigmoid" or self.classes == 1:
            return 1.0 / (1.0 + np.exp(-planes))
        exp = np.exp(planes - planes.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def read(self, logits: np.ndarray) -> PixelReadout:
        """``logits`` read once, for every question asked of them (``PixelReadout``)."""
        return PixelReadout(self, logits)

    # one question each, for callers that ask only one
    def top_classes(self, logits: np.ndarray, k: int) -> list[list[int]]:
        return self.read(logits).top_classes(k)

    def predicted(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.read(logits).predicted()

    def seeds(self, logits: np.ndarray, rows: Sequence[int], classes: Sequence[int],
              dtype=np.float32) -> np.ndarray:
        return self.read(logits).seeds(rows, classes, dtype)

    def summary(self, logits: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.read(logits).summary()


class PixelReadout:
    """A batch of flattened logits read once: the regions, and the per-pixel probabilities when
    first asked for, which the targets, the seeds and the records all come from (a DeepLab
    image's are 5.7 million values; the clean pass asks three questions of them)."""

    def __init__(self, pixel_classes: PixelClasses, logits: np.ndarray):
        self.pixel_classes, self.logits = pixel_classes, logits
        self.owned = pixel_classes.owned(logits)

    @functools.cached_property
    def probabilities(self) -> np.ndarray:
        return self.pixel_classes.probabilities(self.logits)

    def top_classes(self, k: int) -> list[list[int]]:
        """Per image the k classes with the largest regions (ties: the more probable, then the
        lower index), background classes last unless nothing else owns a pixel."""
        owned = self.owned.sum(axis=(2, 3))
        mean_probability = self.probabilities.mean(axis=(2, 3))
        index = np.arange(self.pixel_classes.classes)
        background = np.isin(index, self.pixel_classes.background)
        chosen = []
        for pixels, probability in zip(owned, mean_probability):
            late = background & (pixels[~background].sum() > 0)
            order = np.lexsort((index, -probability, -pixels, late))  # the last key sorts first
            chosen.append([int(c) for c in order[:k]])
        return chosen

    def predicted(self) -> tuple[np.ndarray, np.ndarray]:
        """(G, classes) each class's mean probability over its region and (G,) the top class:
        what ``compare``, ``check`` and ``evaluate`` predict."""
        where = _region_or_image(self.owned)
        mean = (self.probabilities * where).sum(axis=(2, 3)) / where.sum(axis=(2, 3))
        return mean, np.array([row[0] for row in self.top_classes(1)])

    def seeds(self, rows: Sequence[int], classes: Sequence[int], dtype=np.float32) -> np.ndarray:
        """(len(classes), classes * H * W): for each (image row, class), the class's region
        (the whole plane where it owns no pixel) on its plane."""
        pc = self.pixel_classes
        seeds = np.zeros((len(classes), pc.classes, *pc.grid), dtype=dtype)
        for i, (row, cls) in enumerate(zip(rows, classes)):
            region = self.owned[row, cls]
            seeds[i, cls] = region if region.any() else 1
        if pc.channels_last:
            seeds = seeds.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(seeds).reshape(len(classes), -1)

    def summary(self) -> tuple[np.ndarray, ...]:
        """Per image and class, (G, classes) each: the score (the logits summed over the class's
        region, or over the image where it owns no pixel), the probability (their mean there),
        the share of the pixels the region covers; and the regions (G, classes, H, W)."""
        where = _region_or_image(self.owned)
        counts = where.sum(axis=(2, 3))
        scores = (np.asarray(self.pixel_classes.planes(self.logits), dtype=np.float64) * where).sum(axis=(2, 3))
        probabilities = (self.probabilities * where).sum(axis=(2, 3)) / counts
        return scores, probabilities, self.owned.mean(axis=(2, 3)), self.owned


def _region_or_image(owned: np.ndarray) -> np.ndarray:
    """Each class's region, or the whole image where it owns no pixel: where its score is summed."""
    return np.where(owned.any(axis=(2, 3), keepdims=True), owned, True)
