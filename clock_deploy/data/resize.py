"""The one resize every path shares (training transforms, export calibration, runtime).

Torch-free, so the ONNX / TensorRT runtime can use it: a model only sees the same
pixels at deployment if the interpolation is byte-for-byte the one it was trained with.
"""
from PIL import Image


def resize(image: Image.Image, height: int, width: int) -> Image.Image:
    return image.resize((int(width), int(height)), Image.BILINEAR)
