"""onnxcam: gradient class activation maps (Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, XGrad-CAM,
LayerCAM, HiResCAM) for exported ONNX image models, with no deep-learning framework.

    from onnxcam import Explainer
    explanations = Explainer("model.onnx").explain(["cat.jpg"], method="smoothgradcampp")
    explanations[0].save("out")
"""

__version__ = "0.1.0"

from onnxcam.errors import (DataError, ImageError, LayerError, ModelError, OnnxCamError,  # noqa: E402
                            OptionError, TargetError, UnsupportedOperatorError)
from onnxcam.explain import Explainer, Explanation  # noqa: E402

__all__ = [
    "__version__", "Explainer", "Explanation", "OnnxCamError", "ModelError", "LayerError",
    "UnsupportedOperatorError", "ImageError", "TargetError", "OptionError", "DataError",
]
