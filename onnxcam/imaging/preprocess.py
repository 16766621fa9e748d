"""Turning a PIL image into the float32 tensor a model was trained on.

Every preset is one formula applied per channel to the resized 0-255 pixel values ``p``::

    x = (p * scale - mean) / std

    preset      order  scale     mean                        std                    range of x
    imagenet    RGB    1/255     (0.485, 0.456, 0.406)       (0.229, 0.224, 0.225)  about [-2.1, 2.6]
    caffe       BGR    1         (103.939, 116.779, 123.68)  (1, 1, 1)              about [-124, 152]
    unit        RGB    1/255     (0, 0, 0)                   (1, 1, 1)              [0, 1]
    symmetric   RGB    1/255     (0.5, 0.5, 0.5)             (0.5, 0.5, 0.5)        [-1, 1]  (= p/127.5 - 1)
    raw         RGB    1         (0, 0, 0)                   (1, 1, 1)              [0, 255]

An explicit ``mean``/``std`` replaces the preset's and is given in the same units as ``p * scale``
(so 0-1 units for imagenet/unit/symmetric, 0-255 units for caffe/raw) and in the model's channel
order (BGR for caffe). One value applies to every channel.

Images are resized with Pillow's bilinear filter by default (which antialiases when shrinking,
like torchvision on PIL images; ``interpolation`` picks another). By default the whole image is
resized to the model's (H, W), so the map covers the whole image and the aspect ratio is not
kept; ``resize`` = "crop", "stretch-crop" and "pad" cut out the centre or keep the whole image
with its aspect ratio (:mod:`onnxcam.imaging.fit`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from onnxcam.errors import ModelError, OptionError
from onnxcam.imaging.fit import INTERPOLATIONS, Fit, check_interpolation, check_resize, fit_image

LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class Preset:
    """A named normalisation: ``x = (p * scale - mean) / std`` on 0-255 pixels in ``channel_order``."""

    name: str
    channel_order: str  # "RGB" or "BGR"
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "imagenet", "RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
            "torchvision/timm: RGB/255, then (x - mean) / std with the ImageNet statistics",
        ),
        Preset(
            "caffe", "BGR", 1.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0),
            "Caffe/Keras VGG & ResNet50: BGR 0-255 minus the ImageNet mean pixel",
        ),
        Preset("unit", "RGB", 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "RGB/255, in [0, 1]"),
        Preset(
            "symmetric", "RGB", 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
            "Inception/MobileNet (TF): RGB/127.5 - 1, in [-1, 1]",
        ),
        Preset("raw", "RGB", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "RGB 0-255 as float, no scaling"),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive), or an OptionError listing the known ones."""
    preset = PRESETS.get(str(name).strip().lower())
    if preset is None:
        raise OptionError(f"unknown preprocessing preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return preset


class Preprocessor:
    """Resize + normalise PIL images into float32 arrays of shape (C, H, W) or (H, W, C).

    ``size`` is the model's (H, W); ``resize`` is how an image gets there: "stretch" (the whole
    image), "crop" (the centre, after resizing to cover ``size / crop_fraction``), "stretch-crop"
    (the centre, after resizing to ``size / crop_fraction``) or "pad" (the whole image with its
    aspect ratio, on the mean colour); ``interpolation`` is Pillow's filter (bilinear, bicubic,
    nearest, lanczos, box, hamming); ``centring`` puts a crop at ``round(margin / 2)``
    (torchvision, timm) or ``margin // 2`` ("floor": Hugging Face). ``channels`` is 3 (RGB/BGR)
    or 1 (grey: Pillow's "L", L = 0.299 R + 0.587 G + 0.114 B); for 1 channel a 3-value preset
    mean/std is averaged into one.
    Give it images from ``load_image`` (8-bit RGB): other modes are converted with plain
    ``Image.convert``, which clips 16-bit data and drops alpha.
    """

    def __init__(
        self,
        size: tuple[int, int],
        preset: str = "imagenet",
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        layout: str = "NCHW",
        channels: int = 3,
        resize: str = "stretch",
        crop_fraction: float | None = None,
        interpolation: str = "bilinear",
        centring: str = "round",
    ) -> None:
        self.size = _check_size(size)
        self.resize, self.crop_fraction = check_resize(resize, crop_fraction)
        self.interpolation = check_interpolation(interpolation)
        if centring not in ("round", "floor"):
            raise OptionError(f"unknown crop centring {centring!r}; choose round (torchvision) or floor (Hugging Face)")
        self.centring = centring
        self.preset = get_preset(preset)
        self.layout = _check_layout(layout)
        self.channels = _check_channels(channels)
        self.mean = _per_channel("mean", self.preset.mean if mean is None else mean, self.channels, mean is None)
        self.std = _per_channel("std", self.preset.std if std is None else std, self.channels, std is None)
        if np.any(self.std == 0):
            raise OptionError(f"std {tuple(self.std.tolist())} contains 0; every std value must be non-zero")

    @property
    def item_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed image: (C, H, W) for NCHW, (H, W, C) for NHWC."""
        height, width = self.size
        if self.layout == "NCHW":
            return (self.channels, height, width)
        return (height, width, self.channels)

    def fit(self, image_size: tuple[int, int]) -> Fit:
        """How an image of ``image_size`` (H, W) is fitted to the model's size."""
        return fit_image(image_size, self.size, self.resize, self.crop_fraction, self.centring)

    def __call__(self, image: Image.Image) -> np.ndarray:
        mode = "L" if self.channels == 1 else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        fit = self.fit((image.height, image.width))
        resized = image.resize(fit.resized[::-1], INTERPOLATIONS[self.interpolation])
        pixels = np.asarray(resized, dtype=np.float64)
        if self.channels == 1:
            pixels = pixels[:, :, None]
        elif self.preset.channel_order == "BGR":
            pixels = pixels[:, :, ::-1]
        (top, left), (height, width) = fit.offset, self.size
        if top >= 0 and left >= 0:  # stretch or crop: the model's window of the resized image
            pixels = pixels[top:top + height, left:left + width]
        values = (pixels * self.preset.scale - self.mean) / self.std
        if top < 0 or left < 0:  # pad: the resized image on the mean colour, which normalises to 0
            canvas = np.zeros((height, width, values.shape[2]), dtype=np.float64)
            canvas[-top:-top + values.shape[0], -left:-left + values.shape[1]] = values
            values = canvas
        if self.layout == "NCHW":
            values = values.transpose(2, 0, 1)
        return np.ascontiguousarray(values, dtype=np.float32)

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Stack preprocessed images into (N, ...); an empty sequence gives shape (0, ...)."""
        if len(images) == 0:
            return np.empty((0, *self.item_shape), dtype=np.float32)
        return np.stack([self(image) for image in images])

    def __repr__(self) -> str:
        return (
            f"Preprocessor(size={self.size}, preset={self.preset.name!r}, mean={tuple(self.mean.tolist())}, "
            f"std={tuple(self.std.tolist())}, layout={self.layout!r}, channels={self.channels}, "
            f"resize={self.resize!r}, interpolation={self.interpolation!r}"
            + (f", crop_fraction={self.crop_fraction})" if self.crop_fraction is not None else ")")
        )


def detect_layout(
    input_shape: Sequence[int | str | None], name: str = "model input"
) -> tuple[str, tuple[int | None, int | None], int]:
    """Guess (layout, (H, W), channels) from a 4-D model input shape such as [N, 3, 224, 224].

    Symbolic dimensions (a name, None, or a non-positive number) count as unknown. A dimension
    "looks like channels" when it is 1, 3 or 4. The rule, in order:

    1. dim 1 looks like channels and the last does not  -> NCHW   ([N,3,224,224], [1,1,28,28])
    2. the last looks like channels and dim 1 does not  -> NHWC   ([N,224,224,3], [N,?,?,3])
    3. anything else (both or neither look like channels) -> NCHW, the ONNX convention
       ([1,3,3,3], [N,C,H,W] fully symbolic)

    Unknown H or W come back as None. An unknown channel count is reported as 3.
    A shape that is not 4-D raises ModelError naming ``name``.
    """
    dims = [_known_dim(dim) for dim in input_shape]
    if len(dims) != 4:
        raise ModelError(
            f"{name} has shape {list(input_shape)}, not a 4-D image batch (N,C,H,W or N,H,W,C); "
            "choose a model whose input is an image batch"
        )
    first_is_channels = dims[1] in (1, 3, 4)
    last_is_channels = dims[3] in (1, 3, 4)
    if last_is_channels and not first_is_channels:
        layout, (height, width), channels = "NHWC", (dims[1], dims[2]), dims[3]
    else:
        layout, (height, width), channels = "NCHW", (dims[2], dims[3]), dims[1]
    return layout, (height, width), 3 if channels is None else channels


def _known_dim(dim: object) -> int | None:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        return None
    return int(dim)


def _check_size(size: object) -> tuple[int, int]:
    try:
        height, width = size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise OptionError(f"image size {size!r} is not a (height, width) pair; give two positive integers") from None
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise OptionError(
                f"image size {size!r} must be two positive integers (height, width); "
                "give the size explicitly when the model's input size is symbolic"
            )
    return int(height), int(width)


def _check_layout(layout: str) -> str:
    normalised = str(layout).strip().upper()
    if normalised not in LAYOUTS:
        raise OptionError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    return normalised


def _check_channels(channels: object) -> int:
    if isinstance(channels, bool) or channels not in (1, 3):
        raise OptionError(f"unsupported channel count {channels!r}; onnxcam feeds 1 (grey) or 3 (colour) channels")
    return int(channels)  # type: ignore[arg-type]


def _per_channel(what: str, values: Sequence[float] | float, channels: int, from_preset: bool) -> np.ndarray:
    """``values`` as a float vector of length ``channels`` (one value is repeated)."""
    try:
        vector = np.atleast_1d(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError):
        raise OptionError(f"{what} {values!r} is not a number or a list of numbers") from None
    if vector.ndim != 1 or not all(math.isfinite(v) for v in vector):
        raise OptionError(f"{what} {values!r} must be a finite number or a list of {channels} finite numbers")
    if len(vector) == 1:
        vector = np.repeat(vector, channels)
    elif len(vector) != channels:
        if from_preset and channels == 1:
            vector = np.array([vector.mean()])
        else:
            raise OptionError(
                f"{what} {tuple(vector.tolist())} has {len(vector)} values but the model takes {channels} "
                f"channel(s); give 1 or {channels} values"
            )
    return vector
