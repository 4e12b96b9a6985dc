"""Image -> network input, without torch.

The steps are those of the evaluation transforms in clock_deploy/data/transforms.py
(Resize, ToTensor, Normalize): PIL bilinear resize to the network size (aspect ratio
not kept), float32 pixels / 255, minus mean, divided by std. tests/test_runtime.py
checks that both give the same numbers, so a model sees at deployment exactly what
it saw in evaluation.
"""
import os

import numpy as np
from PIL import Image

from clock_deploy.data.images import read_rgb
from clock_deploy.data.resize import resize
from clock_deploy.errors import UserError


def load_image(image):
    """A path, a PIL image or an HxWx3 uint8 RGB array -> HxWx3 uint8 RGB array."""
    if isinstance(image, (str, os.PathLike)):
        return np.asarray(read_rgb(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise UserError(f"expected an HxWx3 uint8 RGB image, got an array of shape {array.shape} "
                        f"and dtype {array.dtype}")
    return array


def resize_image(image, height, width):
    """Resize an HxWx3 uint8 array to height x width exactly as the training transforms do."""
    return np.asarray(resize(Image.fromarray(image), height, width))


def normalize(image, mean, std, divisor=255.0):
    """HxWx3 uint8 -> 3xHxW float32 standardized channels."""
    pixels = image.astype(np.float32) / np.float32(divisor)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def preprocess(images, input_spec):
    """List of images -> (batch [N, 3, H, W] float32, original sizes [(h, w), ...]).

    `input_spec` is the "input" section of the artifact metadata.
    """
    arrays = [load_image(im) for im in images]
    height, width = input_spec["height"], input_spec["width"]
    batch = np.stack([normalize(resize_image(a, height, width), input_spec["mean"], input_spec["std"],
                                input_spec["divisor"]) for a in arrays])
    return batch, [a.shape[:2] for a in arrays]


def boxes_to_original(boxes, input_hw, original_hw):
    """Boxes x1y1x2y2 in network-input pixels -> pixels of the original image (undo the resize)."""
    sy = original_hw[0] / input_hw[0]
    sx = original_hw[1] / input_hw[1]
    return boxes * np.array([sx, sy, sx, sy], dtype=boxes.dtype)
