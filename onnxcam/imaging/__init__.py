"""Everything onnxcam does with pixels: reading images, preprocessing, colouring and figures."""

from onnxcam.imaging.colormap import COLORMAPS, apply_colormap, get_colormap
from onnxcam.imaging.grid import compare_grid
from onnxcam.imaging.io import ALPHA_BACKGROUND, display_path, find_images, load_image, readable_suffixes
from onnxcam.imaging.overlay import check_alpha, outline, overlay, resize_map
from onnxcam.imaging.preprocess import LAYOUTS, PRESETS, Preprocessor, Preset, detect_layout, get_preset

__all__ = [
    "ALPHA_BACKGROUND",
    "COLORMAPS",
    "LAYOUTS",
    "PRESETS",
    "Preprocessor",
    "Preset",
    "apply_colormap",
    "check_alpha",
    "compare_grid",
    "detect_layout",
    "display_path",
    "find_images",
    "get_colormap",
    "get_preset",
    "load_image",
    "outline",
    "overlay",
    "readable_suffixes",
    "resize_map",
]
