"""How an image of any size becomes the model's (H, W): stretched, centre-cropped or padded.

The model sees one rectangle of the image, its *footprint*; a map at the model's input size
belongs there, and region annotations in image pixels are brought into the model's pixels through
it. Three ways to fit:

    stretch       the whole image resized to (H, W); the aspect ratio is not kept (the default)
    crop          resized so that (H, W) / fraction just covers it, keeping its aspect ratio, then
                  the centre (H, W) cut out: torchvision's Resize(256) + CenterCrop(224), timm's
                  crop_pct = 0.875
    stretch-crop  resized to (H, W) / fraction, then the centre (H, W) cut out: Hugging Face's
                  DeiT and BEiT processors (256 x 256, then 224), timm's crop_mode "squash"
    pad           resized so that it just fits in (H, W), keeping its aspect ratio, and centred
                  on a background of the mean colour (0 after normalisation): letterboxing

Sizes follow torchvision: the resized side is ``int(side * scale)`` and the crop's top-left
``int(round(margin / 2))``, so a crop with fraction 0.875 feeds the model the same pixels as
``Resize(256)`` + ``CenterCrop(224)`` on a PIL image. Hugging Face's processors put the crop at
``margin // 2`` instead (``centring="floor"``): one pixel apart where the margin is odd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from onnxcam.errors import OptionError

RESIZE_MODES = ("stretch", "crop", "stretch-crop", "pad")
CROPPING = ("crop", "stretch-crop")
DEFAULT_CROP_FRACTION = 0.875
#: Pillow's filters by name; bilinear (antialiased when shrinking) is torchvision's default
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


@dataclass(frozen=True)
class Fit:
    """One image's way into the model: resize the whole image to ``resized`` (H, W), then take the
    model's (H, W) window whose top-left corner lies at ``offset`` (y, x) in the resized image
    (negative for padding)."""

    image_size: tuple[int, int]
    model_size: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]

    @property
    def footprint(self) -> tuple[float, float, float, float]:
        """(top, left, height, width) in the image's pixels of the rectangle the model sees; it
        reaches outside the image where the model sees padding."""
        scale_y = self.image_size[0] / self.resized[0]
        scale_x = self.image_size[1] / self.resized[1]
        return (self.offset[0] * scale_y, self.offset[1] * scale_x,
                self.model_size[0] * scale_y, self.model_size[1] * scale_x)

    @property
    def is_whole_image(self) -> bool:
        return self.resized == self.model_size and self.offset == (0, 0)


def check_resize(mode: str | None, crop_fraction: float | None = None) -> tuple[str, float | None]:
    """(mode, crop fraction: None unless cropping) checked: an OptionError says what is allowed."""
    name = "stretch" if mode is None else str(mode).strip().lower()
    if name not in RESIZE_MODES:
        raise OptionError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    if crop_fraction is None:
        return name, DEFAULT_CROP_FRACTION if name in CROPPING else None
    try:
        fraction = float(crop_fraction)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise OptionError(f"crop fraction {crop_fraction!r} must be in (0, 1]: the share of the resized "
                          "image's shorter side the crop keeps (0.875 for Resize(256) + CenterCrop(224))")
    if name not in CROPPING:
        raise OptionError(f"a crop fraction only applies when cropping: resize mode 'crop' or 'stretch-crop', "
                          f"not {name!r}")
    return name, fraction


def check_interpolation(name: str | None) -> str:
    """The filter's name checked (default bilinear): an OptionError lists the known ones."""
    value = "bilinear" if name is None else str(name).strip().lower()
    if value not in INTERPOLATIONS:
        raise OptionError(f"unknown interpolation {name!r}; choose one of: {', '.join(INTERPOLATIONS)}")
    return value


def fit_image(image_size: tuple[int, int], model_size: tuple[int, int], mode: str = "stretch",
              crop_fraction: float | None = DEFAULT_CROP_FRACTION, centring: str = "round") -> Fit:
    """The :class:`Fit` of an image of ``image_size`` (H, W) into ``model_size`` (H, W); a crop's
    top-left at ``round(margin / 2)`` (torchvision) or, with ``centring="floor"``, ``margin // 2``
    (Hugging Face)."""
    height, width = (int(side) for side in image_size)
    model_h, model_w = (int(side) for side in model_size)
    if mode == "stretch":
        return Fit((height, width), (model_h, model_w), (model_h, model_w), (0, 0))
    if mode in CROPPING:
        crop_fraction = DEFAULT_CROP_FRACTION if crop_fraction is None else crop_fraction
        # timm: floor(size / crop_pct); the 1e-6 keeps 224 / (224 / 256) at 256, not 255
        cover_h, cover_w = (math.floor(side / crop_fraction + 1e-6) for side in (model_h, model_w))
        if mode == "stretch-crop":
            resized = (cover_h, cover_w)
        elif cover_h / height >= cover_w / width:  # the height binds: it becomes cover_h exactly
            resized = (cover_h, max(model_w, int(width * cover_h / height)))
        else:
            resized = (max(model_h, int(height * cover_w / width)), cover_w)
        margins = (resized[0] - model_h, resized[1] - model_w)
        if centring == "floor":
            offset = (margins[0] // 2, margins[1] // 2)
        else:
            offset = (int(round(margins[0] / 2.0)), int(round(margins[1] / 2.0)))
        return Fit((height, width), (model_h, model_w), resized, offset)
    if mode == "pad":
        if model_h / height <= model_w / width:  # the height binds
            resized = (model_h, min(model_w, max(1, round(width * model_h / height))))
        else:
            resized = (min(model_h, max(1, round(height * model_w / width))), model_w)
        offset = (-((model_h - resized[0]) // 2), -((model_w - resized[1]) // 2))
        return Fit((height, width), (model_h, model_w), resized, offset)
    raise OptionError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
