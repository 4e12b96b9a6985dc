"""Transforms on (image, target) pairs, in the spirit of DETR's datasets/transforms.py.

Input: a PIL image or a uint8 [H, W, 3] array and a target whose "boxes" are absolute
x1, y1, x2, y2 pixels of that image. Normalize (last) turns the image into a normalized
float tensor and the boxes into cx, cy, w, h relative to the image size, which is what the
models predict; relative boxes do not change under Resize, so the network input size and
the original image size never need to be undone by the caller.
There is no padding: every image is resized to the same network input size, so batches
are plain stacked tensors.
"""
import numpy as np
import torch
from PIL import Image

from clock_deploy.data.resize import resize
from clock_deploy.errors import UserError

# ImageNet statistics the backbones are pretrained with; the export metadata records them
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _to_pil(image):
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))


def _image_size(image):
    """(H, W) of a PIL image, a [H, W, C] array or a [C, H, W] tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    return tuple(np.asarray(image).shape[:2])


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomHorizontalFlip:
    """Mirror the image and its boxes with probability p (torch RNG, so DataLoader seeding applies)."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(1).item() >= self.p:
            return image, target
        _, width = _image_size(image)
        if isinstance(image, Image.Image):
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = np.ascontiguousarray(np.asarray(image)[:, ::-1])
        target = dict(target)
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32)
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize to a fixed (height, width), scaling the boxes; aspect ratio is not kept."""

    def __init__(self, height, width):
        self.height, self.width = int(height), int(width)

    def __call__(self, image, target):
        old_h, old_w = _image_size(image)
        image = resize(_to_pil(image), self.height, self.width)
        target = dict(target)
        scale = torch.tensor([self.width / old_w, self.height / old_h] * 2, dtype=torch.float32)
        target["boxes"] = torch.as_tensor(target["boxes"], dtype=torch.float32) * scale
        target["size"] = torch.tensor([self.height, self.width], dtype=torch.int64)
        return image, target

    def __repr__(self):
        return f"Resize({self.height}, {self.width})"


class ToTensor:
    """uint8 image -> float32 [3, H, W] tensor in [0, 1]."""

    def __call__(self, image, target):
        array = np.asarray(_to_pil(image).convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), target

    def __repr__(self):
        return "ToTensor()"


class Normalize:
    """Standardize the image channels and turn boxes into relative cx, cy, w, h."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image, target):
        height, width = image.shape[-2:]
        image = (image - self.mean) / self.std
        target = dict(target)
        x1, y1, x2, y2 = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4).unbind(1)
        boxes = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=1)
        target["boxes"] = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
        target["size"] = torch.tensor([height, width], dtype=torch.int64)
        return image, target

    def __repr__(self):
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"Normalize(mean={mean}, std={std})"


def build_transforms(cfg_data, train):
    """Training: random flip (p = cfg_data.hflip) + resize + normalize; evaluation: resize + normalize."""
    if len(cfg_data.img_size) != 2 or not all(isinstance(v, int) and v > 0 for v in cfg_data.img_size):
        raise UserError(f"data.img_size must be [height, width] in pixels, got {cfg_data.img_size!r}")
    height, width = cfg_data.img_size
    steps = [RandomHorizontalFlip(cfg_data.hflip)] if train and cfg_data.hflip > 0 else []
    steps += [Resize(height, width), ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return Compose(steps)
