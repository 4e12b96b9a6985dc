"""The optional NVIDIA packages, imported only when an engine is built or run: TensorRT or
TensorRT-RTX, and cuda-python. One place for the imports and the install hint, shared by the
runtime, the exporter and the bench; it imports neither torch nor the packages it describes.
"""
import importlib

from clock_deploy.errors import UserError

INSTALL_HINT = ("install it with `pip install clock-deploy[trt]` on x86 with an NVIDIA GPU, "
                "`sudo apt install python3-libnvinfer` (JetPack) on Jetson, "
                "or `pip install clock-deploy[rtx]` (TensorRT-RTX) for RTX GPUs")
BUILDERS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}  # builder name -> Python module
DISPLAY_NAMES = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}


class TensorRTUnavailable(UserError):
    """TensorRT or a usable NVIDIA GPU is missing; the message says what to install."""


def import_tensorrt(builder=None):
    """The builder's module: `builder` ("tensorrt" | "tensorrt-rtx"), or the first one installed."""
    if builder is not None and builder not in BUILDERS:
        raise UserError(f"builder must be one of {list(BUILDERS)}, got '{builder}'")
    for name in [builder] if builder else list(BUILDERS):
        try:
            return importlib.import_module(BUILDERS[name])
        except ImportError:
            continue
    what = DISPLAY_NAMES.get(builder, "TensorRT")
    raise TensorRTUnavailable(f"{what} is not installed: {INSTALL_HINT}")


def import_cudart():
    """cuda-python's CUDA runtime bindings (cuda.bindings.runtime)."""
    try:
        from cuda.bindings import runtime as cudart  # optional: cuda-python, the [trt] / [rtx] extras
    except ImportError:
        raise TensorRTUnavailable(f"cuda-python is not installed: {INSTALL_HINT}") from None
    return cudart
