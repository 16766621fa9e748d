"""One exception hierarchy for everything the user can get wrong.

Every ``OnnxCamError`` is about the user's input (a model, an image, a layer name, an option):
its message is one line that names the thing at fault and says what to do. The CLI turns it into
exit code 2 with no traceback; any other exception is an internal error (exit code 1).
"""


class OnnxCamError(Exception):
    """Base class: a problem with what the user gave onnxcam."""


class ModelError(OnnxCamError):
    """The model file is missing, unreadable, not ONNX, or not a model onnxcam can explain."""


class LayerError(OnnxCamError):
    """A target layer (or score tensor) is unknown or unsuitable."""


class UnsupportedOperatorError(OnnxCamError):
    """An operator on the path from the layer to the score has no gradient rule."""


class ImageError(OnnxCamError):
    """An image file is missing, empty, not an image, or too large."""


class TargetError(OnnxCamError):
    """A class index, neuron or feature-map selection is out of range or malformed."""


class OptionError(OnnxCamError):
    """An option value (method, preset, device, batch size...) is not one onnxcam knows."""


class DataError(OnnxCamError):
    """An evaluation data set, manifest or check configuration is malformed."""
