"""Running rewritten models with ONNX Runtime: device choice, sessions, and the disk cache."""

from onnxcam.runtime.cache import cache_dir, load_gradient_model
from onnxcam.runtime.providers import DEVICES, check_device, create_session, describe
from onnxcam.runtime.session import GradientSession

__all__ = ["DEVICES", "GradientSession", "cache_dir", "check_device", "create_session", "describe",
           "load_gradient_model"]
